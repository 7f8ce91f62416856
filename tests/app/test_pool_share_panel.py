"""The panel shows what other processes sharing the directory hold on each device."""

from __future__ import annotations

import os
import time

import torch

from gpu_control import GPUPool
from gpu_control_gradio.panel_render import render_pool


def test_the_pool_overview_lists_other_processes_models_under_their_device(tmp_path):
    mine = GPUPool(devices=["emulated:0"], budget_gb=8 / 1024, share_dir=tmp_path)
    theirs = GPUPool(devices=["emulated:0"], budget_gb=8 / 1024, share_dir=tmp_path)
    try:
        other = theirs.add(
            "peer.model",
            lambda: torch.nn.Linear(1024, 256, bias=False),
            offload_after_use=False,
            idle_timeout=float("inf"),
        )
        with other.use():
            pass
        deadline = time.monotonic() + 3
        while not mine.get_status()["devices"][0].get("others"):
            assert time.monotonic() < deadline, "the other process's holding never appeared"
            time.sleep(0.01)
        html = render_pool(mine.get_status())
        assert f'data-pid="{os.getpid()}"' in html
        assert f"process {os.getpid()}: peer.model" in html and "priority 0" in html
        status = mine.get_status()["devices"][0]
        assert status["used_gb"] * 1024 == 1.0 and status["models"] == []
    finally:
        mine.close()
        theirs.close()


def test_names_from_the_share_directory_are_escaped():
    status = {
        "devices": [
            {
                "device": "cuda:0",
                "budget_gb": 1.0,
                "used_gb": 0.5,
                "models": [],
                "others": [
                    {
                        "pid": 7,
                        "model": "<img src=x onerror=alert(1)>",
                        "state": "<i>gpu</i>",
                        "gb": 0.5,
                        "in_use": 0,
                        "priority": 2,
                        "idle_s": 3.0,
                    }
                ],
            }
        ],
        "host": {},
        "models": {},
        "waiting": [],
    }
    html = render_pool(status)
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<i>" not in html


def test_the_app_joins_the_share_directory_named_by_gpu_share_dir(tmp_path):
    from app_pool import build_pool, read_pool_settings
    from gpu_control import Settings

    settings = read_pool_settings({"GPU_DEVICES": "emulated:0", "GPU_SHARE_DIR": str(tmp_path)})
    pipeline = type("P", (), {"name": "p", "load": staticmethod(lambda: torch.nn.Linear(4, 4))})()
    pool = build_pool(settings, Settings(), {"p": pipeline})
    try:
        assert "others" in pool.get_status()["devices"][0]
        assert any(name.endswith(".lock") and name != "ledger.lock" for name in os.listdir(tmp_path))
    finally:
        pool.close()
    assert os.listdir(tmp_path) == ["ledger.lock"]

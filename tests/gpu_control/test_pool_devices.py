"""A pool's devices and budgets, and its settings from the environment, validated with sentences."""

from __future__ import annotations

import pytest

from gpu_control import GPUPool, InvalidSetting
from gpu_control.memory import GIB
from gpu_control.pool_devices import EMULATED_TOTAL_GB, PoolSettings, parse_devices


def budgets(pool: GPUPool) -> dict[str, float]:
    return {d["device"]: d["budget_gb"] for d in pool.get_status()["devices"]}


def test_devices_default_to_the_cpu_without_cuda_and_emulated_cards_have_their_own_budget():
    assert [d.name for d in parse_devices(None)] == ["cpu"]
    pool = GPUPool(devices="emulated:0, emulated:1")
    assert pool.devices == ["emulated:0", "emulated:1"]
    assert budgets(pool) == {"emulated:0": EMULATED_TOTAL_GB - 1.0, "emulated:1": EMULATED_TOTAL_GB - 1.0}
    pool = GPUPool(devices=["emulated:0", "emulated:1"], budget_gb={"emulated:1": 2}, reserve_gb=4)
    assert budgets(pool) == {"emulated:0": EMULATED_TOTAL_GB - 4, "emulated:1": 2.0}
    pool = GPUPool(devices=["emulated:0"], budget_gb="emulated:0=1.5")
    assert budgets(pool) == {"emulated:0": 1.5}


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"devices": []}, "empty"),
        ({"devices": ["emulated:0", "emulated:0"]}, "named twice"),
        ({"devices": ["emulated:0", "cpu"]}, "mixes emulated and real"),
        ({"devices": ["tpu:0"]}, "Unknown device"),
        ({"devices": ["cuda:0"]}, "CUDA is not available"),
        ({"devices": [3]}, "must be text"),
        ({"devices": ["emulated:0"], "budget_gb": 0}, "more than 0"),
        ({"devices": ["emulated:0"], "budget_gb": -1}, "budget_gb"),
        ({"devices": ["emulated:0"], "budget_gb": float("nan")}, "budget_gb"),
        ({"devices": ["emulated:0"], "budget_gb": {"emulated:3": 1}}, "not one of the pool's devices"),
        ({"devices": ["emulated:0"], "budget_gb": "lots"}, "budget_gb"),
        ({"devices": ["emulated:0"], "reserve_gb": 100}, "leaves no room"),
        ({"devices": ["emulated:0"], "wait_timeout": -1}, "wait_timeout"),
        ({"devices": ["emulated:0"], "wait_timeout": "never"}, "wait_timeout"),
        ({"devices": ["emulated:0"], "host_budget_gb": 0}, "host_budget_gb"),
    ],
)
def test_bad_pool_settings_are_refused_with_a_sentence(kwargs, words):
    with pytest.raises(InvalidSetting, match=words):
        GPUPool(**kwargs)


def test_settings_from_the_environment_name_the_variable():
    settings = PoolSettings.from_env(
        {
            "GPU_DEVICES": "emulated:0,emulated:1",
            "GPU_BUDGET_GB": "2",
            "GPU_RESERVE_GB": "0.5",
            "GPU_HOST_BUDGET_GB": "8",
            "GPU_WAIT_TIMEOUT": "30",
        }
    )
    pool = GPUPool(**settings.pool_kwargs())
    assert budgets(pool) == {"emulated:0": 2.0, "emulated:1": 2.0}
    assert pool.wait_timeout == 30 and pool.host_budget == 8 * GIB
    assert PoolSettings.from_env({}) == PoolSettings()
    for name, value in (
        ("GPU_DEVICES", "gpu0"),
        ("GPU_BUDGET_GB", "-3"),
        ("GPU_RESERVE_GB", "x"),
        ("GPU_HOST_BUDGET_GB", "0"),
        ("GPU_WAIT_TIMEOUT", "forever"),
    ):
        env = {"GPU_DEVICES": "emulated:0", name: value}
        with pytest.raises(InvalidSetting) as refused:
            PoolSettings.from_env(env)
        message = str(refused.value)
        assert name in message or (name == "GPU_DEVICES" and "gpu0" in message), message

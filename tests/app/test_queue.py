"""The queue: generations take turns in one slot; GPU controls answer at once; shutdown stops jobs cleanly."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status

from gpu_control import GPUResourceManager
from gpu_control_gradio.gpu_panel import ToolError
from pipelines.jobs import JobGate
from pipelines.media import VideoWriter
from ui.blocks import GPU_QUEUE, build_demo, make_generate_fn

from .helpers import GatedPipeline, get_status, video_facts, wait_for
from .test_mcp import call


def submit(client: Client, inputs: dict, **options):
    return client.submit(
        image=handle_file(str(inputs["image"])),
        audio=handle_file(str(inputs["audio"])),
        size=96,
        api_name="/generate_video",
        **options,
    )


def test_offload_and_release_during_a_generation_are_deferred_then_carried_out(gated, inputs):
    gated.pipeline.gate = threading.Event()
    before = get_status(gated.url)["counts"]
    job = submit(Client(gated.url, verbose=False), inputs)
    assert gated.pipeline.generating.wait(30), "the generation never started"

    started = time.perf_counter()
    offload = httpx.post(f"{gated.url}/gpu/offload", timeout=5).json()
    release = json.loads(call(gated.url, "release_gpu").content[0].text)
    answered_in = time.perf_counter() - started

    assert (offload["outcome"], release["outcome"]) == ("deferred", "deferred")
    assert offload["message"].startswith("Deferred: the model is in use")
    assert answered_in < 5, "the controls waited for the job"
    during = get_status(gated.url)
    assert (during["model_location"], during["in_use"], during["pending"]) == (
        "gpu",
        1,
        ["offload", "release"],
    )
    assert not job.done()

    gated.pipeline.gate.set()
    result = json.loads(job.result(timeout=60))
    facts = video_facts(result["video_path"])
    assert facts["codec"] == "h264" and facts["frames"] == result["frames"] > 0

    after = wait_for(lambda: (s := get_status(gated.url))["model_location"] == "unloaded" and s)
    assert after["pending"] == []
    assert after["counts"]["releases"] == before["releases"] + 1
    assert after["last_transition"]["kind"] == "release"
    assert after["last_transition"]["reason"] == "manual"


def test_a_second_generation_waits_for_the_first_in_the_shared_slot(gated, inputs):
    gated.pipeline.gate = threading.Event()
    calls = gated.pipeline.calls
    client = Client(gated.url, verbose=False)
    first = submit(client, inputs)
    assert gated.pipeline.generating.wait(30)
    second = submit(client, inputs, seed=1)

    wait_for(lambda: second.status().code == Status.IN_QUEUE)
    assert gated.pipeline.calls == calls + 1
    assert get_status(gated.url)["in_use"] == 1

    gated.pipeline.gate.set()
    results = [json.loads(job.result(timeout=60)) for job in (first, second)]
    assert gated.pipeline.calls == calls + 2
    assert results[0]["video_path"] != results[1]["video_path"]
    assert all(video_facts(r["video_path"])["frames"] == r["frames"] for r in results)


def test_every_generation_event_shares_the_gpu_slot_and_controls_are_not_queued(tmp_path):
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, auto_monitor=False)
    demo = build_demo(manager, pipeline, output_dir=tmp_path, examples=[["face.png", "speech.wav"]])
    generating = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", "") == "generate_video"]
    assert len(generating) == 2  # the Generate button and the example click
    for fn in generating:
        assert (fn.queue, fn.concurrency_id, fn.concurrency_limit) == (True, GPU_QUEUE, 1)
    others = [fn for fn in demo.fns.values() if fn not in generating]
    assert {fn.name for fn in others} >= {"offload", "release", "preheat", "apply"}
    assert {fn.api_name for fn in others} >= {
        "get_gpu_status",
        "offload_gpu",
        "release_gpu",
        "update_gpu_timeout",
    }
    assert [fn.name for fn in others if fn.queue is not False] == []


class PartialPipeline(GatedPipeline):
    """Writes frames until its partial MP4 is on disk, then holds until the test opens ``gate``."""

    frames = 200

    def __init__(self) -> None:
        super().__init__()
        self.held_after: int | None = None

    def generate(self, model: Any, image: Any, audio: Any, options: Any, progress: Any) -> str:
        self.calls += 1
        folder = Path(options.output_path).parent
        with VideoWriter(
            options.output_path, width=64, height=64, fps=options.fps, audio_rate=None
        ) as writer:
            for index in range(self.frames):
                writer.write_frame(np.full((64, 64, 3), index % 256, np.uint8))
                progress((index + 1) / self.frames, "Rendering frames")
                if self.held_after is None and any(folder.glob(".*.part.mp4")):
                    self.held_after = index + 1
                    self.generating.set()
                    assert self.gate is not None and self.gate.wait(30), "the test never opened the gate"
        return str(options.output_path)


@pytest.fixture()
def held_job(tmp_path):
    """generate_video around a gate of the test's own, with a pipeline that holds mid-video."""
    pipeline = PartialPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, auto_monitor=False)
    gate = JobGate()
    return make_generate_fn(manager, pipeline, tmp_path, gate=gate), pipeline, manager, gate, tmp_path


def test_a_job_cancelled_at_shutdown_stops_at_its_next_frame_and_leaves_nothing(held_job, inputs):
    generate, pipeline, manager, gate, folder = held_job
    pipeline.gate = threading.Event()
    reports: list[float] = []
    outcome: dict[str, BaseException] = {}

    def job() -> None:
        try:
            generate(
                str(inputs["image"]),
                str(inputs["audio"]),
                fps=25,
                size=96,
                progress=lambda fraction, desc=None: reports.append(fraction),
            )
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert pipeline.generating.wait(30), "the partial video never reached the disk"
        assert [p.name.endswith(".part.mp4") for p in folder.iterdir()] == [True]
        assert (gate.running, manager.get_status()["in_use"]) == (1, 1)
        gate.close()
        gate.cancel()
    finally:
        pipeline.gate.set()
        worker.join(30)
    assert not worker.is_alive()

    assert isinstance(outcome.get("error"), ToolError), outcome
    assert str(outcome["error"]) == "The job was cancelled: the server is shutting down. Nothing was kept."
    held = pipeline.held_after
    assert held is not None and held < pipeline.frames
    # waiting, getting the model, then one report per frame up to the hold: the next frame's stopped it
    assert reports == [0.0, 0.0, *[(i + 1) / pipeline.frames for i in range(held)]]
    assert list(folder.iterdir()) == []
    status = manager.get_status()
    assert (status["in_use"], status["model_location"], gate.running) == (0, "cpu", 0)


def test_a_closed_gate_refuses_a_job_before_anything_is_loaded(held_job, inputs):
    generate, pipeline, manager, gate, folder = held_job
    gate.close()
    with pytest.raises(ToolError) as caught:
        generate(str(inputs["image"]), str(inputs["audio"]), size=96, progress=lambda *a, **k: None)
    assert str(caught.value) == "The server is shutting down and takes no new jobs; try again in a minute."
    assert (pipeline.loads, pipeline.calls, manager.get_status()["counts"]["uses"]) == (0, 0, 0)
    assert list(folder.iterdir()) == []


def test_build_demo_runs_jobs_through_the_gate_it_is_given_or_its_own(tmp_path, inputs):
    pipeline = GatedPipeline()
    manager = GPUResourceManager(device="cpu", load_func=pipeline.load, auto_monitor=False)
    gate = JobGate()
    gate.close()
    for given, refused in ((gate, True), (None, False)):
        demo = build_demo(manager, pipeline, output_dir=tmp_path / str(refused), examples=[], gate=given)
        generate = next(fn.fn for fn in demo.fns.values() if fn.api_name == "generate_video")
        arguments = {"size": 64, "progress": lambda *a, **k: None}
        if refused:
            with pytest.raises(ToolError, match="shutting down"):
                generate(str(inputs["image"]), str(inputs["audio"]), **arguments)
        else:
            assert json.loads(generate(str(inputs["image"]), str(inputs["audio"]), **arguments))["frames"] > 0

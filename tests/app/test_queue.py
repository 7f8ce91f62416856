"""The queue: generations take turns in one slot; GPU controls answer at once during a job."""

from __future__ import annotations

import json
import threading
import time

import httpx
from gradio_client import Client, handle_file
from gradio_client.utils import Status

from gpu_control import GPUResourceManager
from ui.blocks import GPU_QUEUE, build_demo

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
    controls = [
        fn for fn in demo.fns.values() if fn.name in {"offload", "release", "preheat", "apply", "current"}
    ]
    controls += [
        fn for fn in demo.fns.values() if fn.api_name in {"get_gpu_status", "offload_gpu", "release_gpu"}
    ]
    assert len(controls) == 8
    assert all(fn.queue is False for fn in controls)

"""Run the README's integration examples against an installed gpu-control and check what they serve.

    python -I run_examples.py EXAMPLES_DIR plain|fastapi|gradio

Run by tests/packaging/test_wheel.py with a virtual environment's Python from a directory
outside the checkout, so that ``gpu_control`` is the installed wheel. Prints one JSON line of
findings; an AssertionError (exit status 1) says what went wrong.
"""

from __future__ import annotations

import json
import runpy
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any


def plain(examples: Path) -> dict[str, Any]:
    """The plain Python example runs to the end (its prints are its own)."""
    runpy.run_path(str(examples / "plain_python.py"), run_name="example")
    return {}


def fastapi(examples: Path) -> dict[str, Any]:
    """The FastAPI example: its own endpoint moves the model; the GPU routes, /docs and /metrics answer."""
    from fastapi.testclient import TestClient

    module = runpy.run_path(str(examples / "fastapi_app.py"), run_name="example")
    client = TestClient(module["app"], base_url="http://127.0.0.1")
    assert client.get("/gpu/status").json()["model_location"] == "unloaded"
    score = client.post("/predict", json=[0.5] * 16)
    assert score.status_code == 200, score.text
    after = client.get("/gpu/status").json()
    docs = client.get("/docs")
    metrics = client.get("/metrics")
    release = client.post("/gpu/release").json()
    return {
        "score": isinstance(score.json()["score"], float),
        "after": after["model_location"],
        "uses": after["counts"]["uses"],
        "docs": docs.status_code == 200 and "swagger-ui" in docs.text,
        "metrics": 'gpu_control_model_location{location="cpu",model="model"} 1.0' in metrics.text,
        "release": release["outcome"],
        "wrong_method": client.get("/gpu/offload").status_code,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gradio(examples: Path) -> dict[str, Any]:
    """The Gradio example served by uvicorn: the page, its function, the GPU tools over the API and MCP."""
    import httpx
    import uvicorn
    from gradio_client import Client

    module = runpy.run_path(str(examples / "gradio_app.py"), run_name="example")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(module["app"], host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        page = httpx.get(f"{url}/", timeout=30)
        client = Client(url, verbose=False)
        score = client.predict(3, api_name="/score")
        status = json.loads(client.predict(api_name="/get_gpu_status"))
        offload = json.loads(client.predict(api_name="/offload_gpu"))
        tools = {tool["name"] for tool in httpx.get(f"{url}/gradio_api/mcp/schema", timeout=30).json()}
        rest = httpx.get(f"{url}/gpu/status", timeout=30).json()
        escape = httpx.get(f"{url}/gradio_api/file=/etc/passwd", timeout=30).status_code
    finally:
        server.should_exit = True
        thread.join(15)
    return {
        "page": page.status_code == 200 and "My app" in page.text,
        "score": isinstance(score, float),
        "status_location": status["model_location"],
        "offload": offload["outcome"],
        "tools": sorted(tools),
        "rest_uses": rest["counts"]["uses"],
        "escape": escape,
    }


if __name__ == "__main__":
    examples_dir, which = Path(sys.argv[1]), sys.argv[2]
    found = {"plain": plain, "fastapi": fastapi, "gradio": gradio}[which](examples_dir)
    import gpu_control

    found["gpu_control_file"] = gpu_control.__file__
    print(json.dumps(found))

"""The MCP server of the running app through the `mcp` client: the five tools, each called."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from gradio_client.utils import encode_file_path
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from gpu_control.errors import ControlLocked
from gpu_control.security import excerpt

from .conftest import CONTROL_TOKEN
from .helpers import get_status, upload, video_facts

TOOLS = {"get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout", "generate_video"}


def with_session(
    url: str,
    body: Callable[[ClientSession], Awaitable[Any]],
    *,
    sse: bool = False,
    headers: dict[str, str] | None = None,
) -> Any:
    """Open an MCP session to the app (streamable HTTP, or SSE) with ``headers`` on every request."""

    async def run() -> Any:
        if sse:
            async with (
                sse_client(f"{url}/gradio_api/mcp/sse", headers=headers) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await body(session)
        async with (
            httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300)) as http,
            streamable_http_client(f"{url}/gradio_api/mcp/", http_client=http) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await body(session)

    return asyncio.run(run())


def call(
    url: str,
    name: str,
    arguments: dict[str, Any] | None = None,
    *,
    headers: dict[str, str] | None = None,
    sse: bool = False,
) -> Any:
    async def body(session: ClientSession) -> Any:
        return await session.call_tool(name, arguments or {})

    return with_session(url, body, headers=headers, sse=sse)


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_list_tools_has_exactly_the_five_tools_with_descriptions(gated):
    async def body(session: ClientSession) -> Any:
        return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in with_session(gated.url, body)}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert len(tool.description) > 40, tool.name
    assert tools["update_gpu_timeout"].inputSchema["required"] == ["timeout_seconds"]
    generate = tools["generate_video"].inputSchema
    assert generate["required"] == ["image", "audio"]
    assert "portrait" in generate["properties"]["image"]["description"]
    assert generate["properties"]["size"]["default"] == 512


def test_the_sse_transport_lists_the_same_tools(gated):
    async def body(session: ClientSession) -> Any:
        return {tool.name for tool in (await session.list_tools()).tools}

    assert with_session(gated.url, body, sse=True) == TOOLS


def test_the_schema_route_describes_the_five_tools(gated):
    schema = httpx.get(f"{gated.url}/gradio_api/mcp/schema").json()
    assert {tool["name"] for tool in schema} == TOOLS


def test_get_gpu_status_returns_status_json(gated):
    result = call(gated.url, "get_gpu_status")
    assert not result.isError
    status = json.loads(result.content[0].text)
    assert status["model_location"] == "unloaded"
    assert status["name"] == "test-portrait"


def test_offload_and_release_tools_move_a_preheated_model(gated):
    gated.manager.preheat()
    offload = json.loads(call(gated.url, "offload_gpu").content[0].text)
    assert (offload["outcome"], offload["status"]["model_location"]) == ("done", "cpu")
    release = json.loads(call(gated.url, "release_gpu").content[0].text)
    assert (release["outcome"], release["status"]["model_location"]) == ("done", "unloaded")
    nothing = json.loads(call(gated.url, "release_gpu").content[0].text)
    assert nothing["outcome"] == "nothing_to_do"


def test_update_gpu_timeout_changes_the_settings(gated):
    result = call(
        gated.url,
        "update_gpu_timeout",
        {"timeout_seconds": 300, "release_timeout_seconds": 900, "offload_after_use": False},
    )
    answer = json.loads(result.content[0].text)
    assert (
        answer["message"]
        == "Idle timeout set to 300 s. Release timeout set to 900 s. Offload after use turned off."
    )
    assert (gated.manager.idle_timeout, gated.manager.release_timeout, gated.manager.offload_after_use) == (
        300.0,
        900.0,
        False,
    )


def test_update_gpu_timeout_rejects_a_negative_value_with_a_plain_sentence(gated):
    result = call(gated.url, "update_gpu_timeout", {"timeout_seconds": -3})
    assert result.isError
    assert result.content[0].text == "timeout_seconds must be 0 or more seconds, not -3."
    assert gated.manager.idle_timeout == 60.0


def test_generate_video_from_data_uris_returns_a_downloadable_video(gated, inputs):
    result = call(
        gated.url,
        "generate_video",
        {
            "image": data_uri(inputs["image"], "image/png"),
            "audio": data_uri(inputs["audio"], "audio/wav"),
            "size": 96,
            "fps": 10,
        },
    )
    assert not result.isError, result.content
    answer = json.loads(result.content[0].text)
    assert answer["video_url"].startswith(f"{gated.url}/gradio_api/file=")
    assert (answer["fps"], max(answer["width"], answer["height"])) == (10, 96)
    facts = video_facts(answer["video_path"])
    assert (facts["codec"], facts["frames"]) == ("h264", answer["frames"])
    assert get_status(gated.url)["model_location"] == "cpu"


LOCKED = (
    "GPU control is locked: send the control token (Authorization: Bearer <token>, "
    "or the token field of the GPU panel). Status and generation stay open."
)
FOREIGN = "Refused: this control request came from another site's page (its Origin is not this app's)."
CONTROL_CALLS = {
    "offload_gpu": {},
    "release_gpu": {},
    "update_gpu_timeout": {"timeout_seconds": 5, "release_timeout_seconds": 7, "offload_after_use": False},
}


def state(live) -> tuple[Any, ...]:
    status = live.manager.get_status()
    manager = live.manager
    return (status["model_location"], status["counts"], manager.idle_timeout, manager.release_timeout)


def test_the_lock_text_is_the_errors_own():
    assert str(ControlLocked(LOCKED)) == LOCKED


def test_no_tool_schema_shows_the_request_parameter(locked):
    async def body(session: ClientSession) -> Any:
        return (await session.list_tools()).tools

    for tool in with_session(locked.url, body):
        assert "request" not in tool.inputSchema.get("properties", {}), tool.name
    tools = {tool.name: tool for tool in with_session(locked.url, body)}
    assert "Authorization: Bearer <token>" in tools["offload_gpu"].description


@pytest.mark.parametrize("tool", sorted(CONTROL_CALLS))
@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Bearer wrong-token-0000"}, {"Authorization": CONTROL_TOKEN}],
    ids=["no-token", "wrong-token", "no-bearer-scheme"],
)
def test_locked_control_tools_refuse_without_the_bearer_token(locked, tool, headers):
    locked.manager.preheat()
    before = state(locked)
    result = call(locked.url, tool, CONTROL_CALLS[tool], headers=headers)
    assert result.isError
    assert result.content[0].text == LOCKED
    assert state(locked) == before


@pytest.mark.parametrize("sse", [False, True], ids=["streamable-http", "sse"])
def test_locked_control_tools_obey_the_authorization_header_of_the_mcp_request(locked, sse):
    locked.manager.preheat()
    token = {"Authorization": f"Bearer {CONTROL_TOKEN}"}
    offload = json.loads(call(locked.url, "offload_gpu", headers=token, sse=sse).content[0].text)
    assert (offload["outcome"], offload["status"]["model_location"]) == ("done", "cpu")
    arguments = CONTROL_CALLS["update_gpu_timeout"]
    timeouts = call(locked.url, "update_gpu_timeout", arguments, headers=token, sse=sse)
    assert not timeouts.isError, timeouts.content
    assert (locked.manager.idle_timeout, locked.manager.release_timeout) == (5.0, 7.0)
    release = json.loads(call(locked.url, "release_gpu", headers=token, sse=sse).content[0].text)
    assert (release["outcome"], release["status"]["model_location"]) == ("done", "unloaded")


def test_the_sse_transport_refuses_without_the_token_too(locked):
    locked.manager.preheat()
    result = call(locked.url, "release_gpu", sse=True)
    assert (result.isError, result.content[0].text) == (True, LOCKED)
    assert locked.manager.get_status()["model_location"] == "gpu"


def test_get_gpu_status_stays_open_on_a_locked_app(locked):
    result = call(locked.url, "get_gpu_status")
    assert not result.isError
    assert json.loads(result.content[0].text)["model_location"] == "unloaded"


@pytest.mark.parametrize("tool", sorted(CONTROL_CALLS))
def test_a_foreign_origin_is_refused_even_with_the_token(locked, tool):
    locked.manager.preheat()
    before = state(locked)
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}", "Origin": "https://evil.example"}
    result = call(locked.url, tool, CONTROL_CALLS[tool], headers=headers)
    assert (result.isError, result.content[0].text) == (True, FOREIGN)
    assert state(locked) == before


def test_a_foreign_origin_is_refused_by_the_open_app(gated):
    gated.manager.preheat()
    result = call(gated.url, "release_gpu", headers={"Origin": "https://evil.example"})
    assert (result.isError, result.content[0].text) == (True, FOREIGN)
    assert gated.manager.get_status()["model_location"] == "gpu"
    same = call(gated.url, "release_gpu", headers={"Origin": gated.url})
    assert json.loads(same.content[0].text)["outcome"] == "done"


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({"timeout_seconds": None}, "timeout_seconds"),
        ({"timeout_seconds": "abc"}, "timeout_seconds must be a number of seconds"),
        ({"timeout_seconds": 1e308}, "timeout_seconds"),
        ({"timeout_seconds": 60, "release_timeout_seconds": -1}, "release_timeout_seconds must be 0 or more"),
        ({"timeout_seconds": "x" * 100_000}, "characters)"),
    ],
)
def test_update_gpu_timeout_answers_bad_values_with_a_short_sentence(gated, arguments, needle):
    result = call(gated.url, "update_gpu_timeout", arguments)
    assert result.isError
    assert needle in result.content[0].text
    assert len(result.content[0].text) < 300
    assert "Traceback" not in result.content[0].text
    assert (gated.manager.idle_timeout, gated.manager.release_timeout) == (60.0, 0.0)


def test_update_gpu_timeout_takes_never_as_text(gated):
    arguments = {"timeout_seconds": "never", "release_timeout_seconds": "never"}
    result = call(gated.url, "update_gpu_timeout", arguments)
    answer = json.loads(result.content[0].text)
    assert answer["message"] == "Idle timeout set to never. Release timeout set to never."
    assert (gated.manager.idle_timeout, gated.manager.release_timeout) == (float("inf"), 0.0)


def test_an_unknown_argument_name_is_refused_with_an_excerpt(gated):
    name = "b" * 50_000
    result = call(gated.url, "update_gpu_timeout", {"timeout_seconds": 5, name: 1})
    sentence = (
        f"Tool 'update_gpu_timeout' has no argument {excerpt(name)}; it takes 'timeout_seconds', "
        "'release_timeout_seconds', 'offload_after_use'."
    )
    assert (result.isError, result.content[0].text) == (True, sentence)
    assert len(result.content[0].text) < 300
    assert gated.manager.idle_timeout == 60.0


def test_a_file_uploaded_to_the_app_is_passed_as_the_url_gradios_upload_tool_returns(gated, inputs):
    """What ``gradio upload-mcp``'s upload_file_to_gradio returns: ``<app>/gradio_api/file=<upload path>``.

    Gradio would fetch that URL and refuse it as a loopback address; the app takes the uploaded
    file itself instead.
    """
    image, audio = upload(gated.url, inputs["image"], inputs["audio"])
    calls = gated.pipeline.calls
    for host in ("127.0.0.1", "localhost"):
        base = gated.url.replace("127.0.0.1", host)
        arguments = {
            "image": f"{base}/gradio_api/file={encode_file_path(image['path'])}",
            "audio": f"{base}/gradio_api/file={encode_file_path(audio['path'])}",
            "size": 64,
        }
        result = call(gated.url, "generate_video", arguments)
        assert not result.isError, result.content[0].text
        answer = json.loads(result.content[0].text)
        assert video_facts(answer["video_path"])["frames"] == answer["frames"] > 0
    assert gated.pipeline.calls == calls + 2

"""The MCP server of the running app through the `mcp` client: the five tools, each called."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from .helpers import get_status, video_facts

TOOLS = {"get_gpu_status", "offload_gpu", "release_gpu", "update_gpu_timeout", "generate_video"}


def with_session(url: str, body: Callable[[ClientSession], Awaitable[Any]], *, sse: bool = False) -> Any:
    """Open an MCP session to the app (streamable HTTP, or SSE) and run ``body`` in it."""

    async def run() -> Any:
        if sse:
            async with (
                sse_client(f"{url}/gradio_api/mcp/sse") as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                return await body(session)
        async with (
            streamable_http_client(f"{url}/gradio_api/mcp/") as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await body(session)

    return asyncio.run(run())


def call(url: str, name: str, arguments: dict[str, Any] | None = None) -> Any:
    async def body(session: ClientSession) -> Any:
        return await session.call_tool(name, arguments or {})

    return with_session(url, body)


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
    import httpx

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

"""ControlAccess and the control token, without a web server: headers are plain mappings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_control import ControlAccess, ControlLocked, ForeignOrigin, InvalidSetting, read_control_token
from gpu_control.security import excerpt, is_loopback_host

TOKEN = "s3cret-token-value"
HOST = {"host": "127.0.0.1:7860"}


def test_a_locked_access_needs_the_bearer_token_or_the_typed_one():
    access = ControlAccess(TOKEN)
    access.authorize({**HOST, "Authorization": f"Bearer {TOKEN}"})
    access.authorize({**HOST, "authorization": f"bearer   {TOKEN}  "})
    access.authorize(HOST, token=f" {TOKEN} ")
    for headers, typed in [
        (HOST, None),
        ({**HOST, "Authorization": f"Basic {TOKEN}"}, None),
        ({**HOST, "Authorization": f"Bearer {TOKEN}x"}, None),
        ({**HOST, "Authorization": "Bearer"}, ""),
        (HOST, TOKEN[:-1]),
    ]:
        with pytest.raises(ControlLocked):
            access.authorize(headers, token=typed)


def test_a_lone_surrogate_in_the_typed_token_is_a_wrong_token_not_a_crash():
    with pytest.raises(ControlLocked):
        ControlAccess(TOKEN).authorize(HOST, token="\ud800")


@pytest.mark.parametrize(
    "origin, allowed",
    [
        (None, True),
        ("http://127.0.0.1:7860", True),
        ("https://evil.example", False),
        ("http://127.0.0.1:7861", False),
        ("null", False),
        ("file://", False),
        ("http://127.0.0.1:7860.evil.example", False),
    ],
)
def test_only_the_apps_own_origin_may_change_state(origin, allowed):
    headers = dict(HOST) if origin is None else {**HOST, "Origin": origin}
    access = ControlAccess()
    assert access.origin_allowed(headers) is allowed
    if not allowed:
        with pytest.raises(ForeignOrigin):
            access.authorize(headers)


def test_a_forwarded_host_and_configured_origins_count_as_the_apps_own():
    headers = {
        "host": "10.0.0.5:7860",
        "x-forwarded-host": "gpu.example.org",
        "origin": "https://gpu.example.org",
    }
    assert ControlAccess().origin_allowed(headers)
    front = {**HOST, "origin": "https://ui.example.org"}
    assert ControlAccess(allowed_origins=("https://ui.example.org",)).origin_allowed(front)


@pytest.mark.parametrize(
    "host, refused",
    [
        ("127.0.0.1:7860", False),
        ("localhost:7860", False),
        ("[::1]:7860", False),
        ("127.5.6.7", False),
        ("attacker.example:7860", True),
        ("192.168.1.10:7860", True),
    ],
)
def test_local_only_without_a_token_refuses_a_rebound_host(host, refused):
    """DNS rebinding: the attacker's page is same-origin, but its Host names the attacker's domain."""
    headers = {"host": host, "origin": f"http://{host}"}
    access = ControlAccess(local_only=True)
    if refused:
        with pytest.raises(ForeignOrigin) as caught:
            access.authorize(headers)
        assert "GPU_CONTROL_TOKEN" in str(caught.value)
    else:
        access.authorize(headers)
    ControlAccess(local_only=False).authorize(headers)
    ControlAccess(TOKEN, local_only=True).authorize({**headers, "authorization": f"Bearer {TOKEN}"})


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("[::1]:80", True),
        ("::1", True),
        ("app.localhost:7860", True),
        ("0.0.0.0", False),
        ("example.org", False),
        ("[::2]", False),
        ("evillocalhost", False),
        ("localhost.attacker.example", False),
        ("127.0.0.1.nip.io:7871", False),
        ("[::1]evil.com", False),
        ("localhost:7871@evil.com", False),
        ("[::1", False),
        ("", False),
        ("localhost, evil.com", False),
    ],
)
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


def test_the_token_comes_from_the_file_before_the_environment(tmp_path: Path):
    secret = tmp_path / "token"
    secret.write_text(f"\ufeff{TOKEN}\n# rotated 2026-12-01\n", encoding="utf-8")
    assert read_control_token({"GPU_CONTROL_TOKEN": "other-token-123"}, secret) == TOKEN
    assert read_control_token({"GPU_CONTROL_TOKEN": f"  {TOKEN}\n"}) == TOKEN
    assert read_control_token({}) is None


@pytest.mark.parametrize(
    "value, message",
    [
        ("", "GPU_CONTROL_TOKEN is empty: give it a token"),
        ("   ", "GPU_CONTROL_TOKEN is empty: give it a token"),
        ("short", "GPU_CONTROL_TOKEN must be 8 to 4096 characters long"),
        ("two words here", "GPU_CONTROL_TOKEN must be one word without spaces."),
        ("tøken-ünïcode-1", "GPU_CONTROL_TOKEN must be printable ASCII"),
    ],
)
def test_a_token_that_cannot_work_stops_the_start(value, message):
    with pytest.raises(InvalidSetting) as caught:
        read_control_token({"GPU_CONTROL_TOKEN": value})
    assert str(caught.value).startswith(message)
    if value.strip():
        assert value not in str(caught.value)


def test_an_unreadable_token_file_is_named_without_its_content(tmp_path: Path):
    with pytest.raises(InvalidSetting) as caught:
        read_control_token({}, tmp_path / "missing")
    shown = excerpt(str(tmp_path / "missing"))
    assert str(caught.value) == f"--control-token-file {shown} cannot be read: No such file or directory."


def test_excerpt_cuts_and_counts():
    assert excerpt("abc") == "'abc'"
    assert excerpt("x" * 100) == "'" + "x" * 59 + "… (102 characters)"
    assert excerpt(10**5000) == "a number with thousands of digits"


def test_a_typed_token_is_enough_whatever_the_authorization_header_says():
    ControlAccess(TOKEN).authorize({**HOST, "Authorization": "Bearer wrong-token-123"}, token=TOKEN)


def test_an_empty_host_is_not_loopback_for_a_local_only_app():
    with pytest.raises(ForeignOrigin):
        ControlAccess(local_only=True).authorize({"host": ""})
    ControlAccess(local_only=True).authorize(None)  # a call made inside the process has no request


@pytest.mark.parametrize(
    "site, allowed", [("same-origin", True), ("none", True), ("same-site", False), ("cross-site", False)]
)
def test_the_browsers_sec_fetch_site_beats_a_forged_forwarded_host(site, allowed):
    """A page elsewhere can add X-Forwarded-Host (after a CORS preflight) but not Sec-Fetch-Site."""
    headers = {
        "host": "gpu-server.lan:7860",
        "origin": "https://evil.example",
        "x-forwarded-host": "evil.example",
        "sec-fetch-site": site,
    }
    assert ControlAccess().origin_allowed(headers) is allowed
    own = {"host": "gpu-server.lan:7860", "origin": "http://gpu-server.lan:7860", "sec-fetch-site": site}
    assert ControlAccess().origin_allowed(own) is allowed

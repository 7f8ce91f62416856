"""`python app.py`: flags and environment, exit status 2 on bad config, and a real start."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest

from app import DEFAULT_PORT, ConfigError, load_config, main
from gpu_control.security import excerpt

from .helpers import ROOT, app_env, app_process


def test_defaults_listen_on_loopback_port_7860_with_the_seed_policy_and_control_open():
    config = load_config([], {})
    assert (config.host, config.port, config.pipeline, config.share) == (
        "127.0.0.1",
        DEFAULT_PORT,
        None,
        False,
    )
    assert (config.control_token, config.allow_url_inputs, config.shutdown_grace_s) == (None, True, 8.0)
    settings = config.settings
    assert (settings.idle_timeout, settings.release_timeout, settings.offload_after_use, settings.device) == (
        60.0,
        0.0,
        True,
        None,
    )


def test_environment_is_read_and_flags_override_it():
    env = {
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": "7999",
        "GPU_IDLE_TIMEOUT": "120",
        "GPU_RELEASE_TIMEOUT": "600",
        "GPU_DEVICE": "cpu",
    }
    from_env = load_config([], env)
    assert (from_env.host, from_env.port) == ("127.0.0.1", 7999)
    assert (from_env.settings.idle_timeout, from_env.settings.release_timeout) == (120.0, 600.0)
    flags = load_config(
        [
            "--host",
            "::1",
            "--port",
            "8000",
            "--idle-timeout",
            "5",
            "--release-timeout",
            "0",
            "--keep-on-gpu",
            "--device",
            "cpu",
            "--pipeline",
            "mypkg.mod:factory",
            "--share",
        ],
        env,
    )
    assert (flags.host, flags.port, flags.pipeline, flags.share) == ("::1", 8000, "mypkg.mod:factory", True)
    assert (
        flags.settings.idle_timeout,
        flags.settings.release_timeout,
        flags.settings.offload_after_use,
    ) == (
        5.0,
        0.0,
        False,
    )


def test_control_token_comes_from_the_environment_or_a_file_which_wins(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("  file-token-0123456789\n", encoding="utf-8")
    assert load_config([], {"GPU_CONTROL_TOKEN": "env-token-0123"}).control_token == "env-token-0123"
    from_file = load_config(["--control-token-file", str(secret)], {"GPU_CONTROL_TOKEN": "env-token-0123"})
    assert from_file.control_token == "file-token-0123456789"
    assert "file-token" not in repr(from_file)
    assert load_config([], {}).control_token is None


def test_url_inputs_and_the_shutdown_grace_come_from_the_environment():
    config = load_config([], {"ALLOW_URL_INPUTS": "false", "SHUTDOWN_GRACE_S": "2.5"})
    assert (config.allow_url_inputs, config.shutdown_grace_s) == (False, 2.5)
    assert load_config([], {"ALLOW_URL_INPUTS": "yes", "SHUTDOWN_GRACE_S": "0"}).shutdown_grace_s == 0


def test_video_retention_comes_from_the_environment_and_the_flag_overrides_it():
    assert load_config([], {}).keep_videos_s == 24 * 3600
    assert load_config([], {"VIDEO_RETENTION_HOURS": "2"}).keep_videos_s == 2 * 3600
    assert load_config(["--keep-videos-hours", "0"], {"VIDEO_RETENTION_HOURS": "2"}).keep_videos_s == 0


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--idle-timeout", "-1"], {}, "--idle-timeout must be 0 or more seconds"),
        (["--release-timeout", "inf"], {}, "--release-timeout must be a finite number"),
        (["--port", "99999"], {}, "--port must be a port number"),
        ([], {"GRADIO_SERVER_PORT": "http"}, "GRADIO_SERVER_PORT must be a port number"),
        ([], {"GPU_IDLE_TIMEOUT": "soon"}, "GPU_IDLE_TIMEOUT must be a number of seconds"),
        ([], {"GPU_OFFLOAD_AFTER_USE": "sometimes"}, "GPU_OFFLOAD_AFTER_USE must be true or false"),
        (["--device", "tpu"], {}, "--device must be 'cpu', 'cuda' or 'cuda:N'"),
        (["--keep-videos-hours", "-2"], {}, "--keep-videos-hours must be 0 or more hours"),
        ([], {"VIDEO_RETENTION_HOURS": "a day"}, "VIDEO_RETENTION_HOURS must be a number of hours"),
        (["--output-dir", "/proc/no-such-dir"], {}, "--output-dir '/proc/no-such-dir' cannot be created"),
        (["--keep-videos-hours", "721"], {}, "--keep-videos-hours must be a number of hours from 0 to 720"),
        ([], {"GPU_CONTROL_TOKEN": "short"}, "GPU_CONTROL_TOKEN must be 8 to 4096 characters long"),
        ([], {"GPU_CONTROL_TOKEN": "  "}, "GPU_CONTROL_TOKEN is empty: give it a token"),
        ([], {"GPU_CONTROL_TOKEN": "two words here"}, "GPU_CONTROL_TOKEN must be one word without spaces"),
        (["--control-token-file", "/no/token"], {}, "--control-token-file '/no/token' cannot be read"),
        ([], {"ALLOW_URL_INPUTS": "maybe"}, "ALLOW_URL_INPUTS must be true or false, not 'maybe'"),
        ([], {"SHUTDOWN_GRACE_S": "301"}, "SHUTDOWN_GRACE_S must be a number of seconds from 0 to 300"),
        ([], {"SHUTDOWN_GRACE_S": "-1"}, "SHUTDOWN_GRACE_S must be 0 or more seconds"),
        ([], {"SHUTDOWN_GRACE_S": "inf"}, "SHUTDOWN_GRACE_S must be a finite number of seconds"),
        ([], {"SHUTDOWN_GRACE_S": "soon"}, "SHUTDOWN_GRACE_S must be a number of seconds from 0 to 300"),
    ],
)
def test_bad_values_raise_config_error_naming_the_flag_or_variable(argv, env, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(argv, env)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--idle-timeout", "-1"], "error: --idle-timeout must be 0 or more seconds"),
        (["--pipeline", "no_such_module_here:make"], "error: Cannot import module 'no_such_module_here'"),
        (["--pipeline", "json"], "error: Pipeline 'json' must look like 'package.module:attribute'"),
    ]
    + ([] if __import__("torch").cuda.is_available() else [(["--device", "cuda"], "error: Device 'cuda'")]),
)
def test_main_exits_2_with_one_line_and_no_traceback(argv, needle, capsys, monkeypatch):
    monkeypatch.delenv("GPU_DEVICE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle)
    assert "Traceback" not in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("abc", "error: PIPELINE_MAX_AUDIO_SECONDS='abc' is not a number of seconds."),
        ("-4", "error: PIPELINE_MAX_AUDIO_SECONDS='-4' is out of range"),
    ],
)
def test_a_bad_audio_limit_stops_the_app_at_start_up(value, needle, capsys, monkeypatch):
    monkeypatch.setenv("PIPELINE_MAX_AUDIO_SECONDS", value)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle)
    assert err.count("\n") == 1


def test_main_refuses_a_token_file_holding_spaces_without_echoing_it(tmp_path, capsys):
    secret = tmp_path / "token"
    secret.write_text("my secret passphrase\n", encoding="utf-8")
    assert main(["--control-token-file", str(secret)]) == 2
    err = capsys.readouterr().err
    assert err == "error: --control-token-file must be one word without spaces.\n"


def test_python_app_py_with_a_bad_variable_exits_2_without_traceback():
    done = subprocess.run(
        [sys.executable, "app.py"],
        cwd=ROOT,
        env=app_env(GPU_IDLE_TIMEOUT="-5"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1] == "error: GPU_IDLE_TIMEOUT must be 0 or more seconds, not '-5'."
    )
    assert "Traceback" not in done.stderr


def test_python_app_py_with_an_unreadable_token_file_exits_2_with_one_sentence(tmp_path):
    missing = tmp_path / "no-token"
    done = subprocess.run(
        [sys.executable, "app.py", "--control-token-file", str(missing)],
        cwd=ROOT,
        env=app_env(GPU_CONTROL_TOKEN="env-token-0123"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    shown = excerpt(str(missing))
    assert done.stderr == f"error: --control-token-file {shown} cannot be read: No such file or directory.\n"
    assert done.stdout == ""


def test_python_app_py_serves_rest_ui_and_docs_loads_nothing_and_stops_at_sigterm(tmp_path):
    with app_process("--output-dir", str(tmp_path), GRADIO_SERVER_NAME="127.0.0.1") as app:
        app.wait_until_serving()
        status = httpx.get(f"{app.url}/gpu/status", timeout=10)
        assert status.status_code == 200
        assert status.json()["model_location"] == "unloaded"
        assert status.json()["counts"]["loads"] == 0
        assert status.json()["monitor_running"] is True
        assert httpx.get(f"{app.url}/").status_code == 200
        assert httpx.get(f"{app.url}/docs").status_code == 200
        app.stop(signal.SIGTERM, timeout=30)
    assert app.process.returncode == 0
    assert "Traceback" not in app.output
    assert f"Talking Portrait on http://127.0.0.1:{app.port} (listening on 127.0.0.1" in app.output
    assert "INFO serving: Shutting down\n" in app.output


def test_share_link_is_logged_as_https(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from gradio import networking

    from app import _open_share_link

    calls = []
    monkeypatch.setattr(
        networking, "setup_tunnel", lambda *args: calls.append(args) or "http://abc123.gradio.live"
    )
    with caplog.at_level(logging.INFO, logger="app"):
        _open_share_link(SimpleNamespace(started=True, should_exit=False), 7861)
    assert calls[0][:2] == ("127.0.0.1", 7861)
    assert "Public share link (temporary): https://abc123.gradio.live" in caplog.text


def test_share_link_failure_only_warns(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from gradio import networking

    from app import _open_share_link

    def fail(*args):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr(networking, "setup_tunnel", fail)
    with caplog.at_level(logging.WARNING, logger="app"):
        _open_share_link(SimpleNamespace(started=True, should_exit=False), 7861)
    assert "Could not open a share link (Could not get share link from Gradio API Server.)" in caplog.text


def test_a_name_for_loopback_counts_as_this_machine_only(monkeypatch):
    import socket

    from app import listens_on_loopback

    assert listens_on_loopback("127.0.0.1") and listens_on_loopback("localhost") and listens_on_loopback("::1")
    assert not listens_on_loopback("0.0.0.0")

    def lookup(host, *args, **kwargs):
        addresses = {"vm": ["127.0.1.1"], "box": ["127.0.0.1", "192.168.1.9"]}[host]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    assert listens_on_loopback("vm")
    assert not listens_on_loopback("box")

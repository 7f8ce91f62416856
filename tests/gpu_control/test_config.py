"""Settings from the environment, validated in one place; the process-wide manager."""

from __future__ import annotations

import math
import types

import pytest

import gpu_control
from gpu_control import InvalidSetting, Settings, get_gpu_manager, reset_gpu_manager
from gpu_control import config


def test_defaults_match_the_seed():
    settings = Settings.from_env({})
    assert (settings.idle_timeout, settings.release_timeout, settings.offload_after_use, settings.device) == (
        60.0,
        0.0,
        True,
        None,
    )


def test_environment_variables_are_read():
    env = {
        "GPU_IDLE_TIMEOUT": "300",
        "GPU_RELEASE_TIMEOUT": " 900 ",
        "GPU_OFFLOAD_AFTER_USE": "false",
        "GPU_DEVICE": "cuda:1",
    }
    settings = Settings.from_env(env)
    assert (settings.idle_timeout, settings.release_timeout, settings.offload_after_use, settings.device) == (
        300.0,
        900.0,
        False,
        "cuda:1",
    )


@pytest.mark.parametrize(
    "name, value",
    [
        ("GPU_IDLE_TIMEOUT", "abc"),
        ("GPU_IDLE_TIMEOUT", "-5"),
        ("GPU_IDLE_TIMEOUT", "nan"),
        ("GPU_RELEASE_TIMEOUT", "inf"),
        ("GPU_OFFLOAD_AFTER_USE", "sometimes"),
        ("GPU_DEVICE", "gpu0"),
        ("GPU_PIN_LIMIT_GB", "lots"),
    ],
)
def test_a_bad_variable_fails_with_a_message_naming_it(name, value):
    with pytest.raises(InvalidSetting, match=name):
        Settings.from_env({name: value})


SECONDS = "a number of seconds from 0 to 2592000 (30 days)"


def test_the_longest_timeout_is_thirty_days():
    assert config.MAX_TIMEOUT_S == 2_592_000
    assert "MAX_TIMEOUT_S" in config.__all__


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, 0.0),
        ("0", 0.0),
        (" 90.5 ", 90.5),
        (2_592_000, 2_592_000.0),
        ("2592000", 2_592_000.0),
        (math.inf, math.inf),
        ("inf", math.inf),
        ("Infinity", math.inf),
        (" NEVER ", math.inf),
    ],
)
def test_a_timeout_from_0_to_30_days_or_never_is_accepted(value, expected):
    assert config.validate_timeout("idle_timeout", value) == expected


@pytest.mark.parametrize(
    "value, shown",
    [(-1, "-1"), ("-0.5", "'-0.5'"), (-1e308, "-1e+308"), ("-inf", "'-inf'"), (-math.inf, "-inf")],
)
def test_a_negative_timeout_is_refused_with_one_sentence(value, shown):
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("idle_timeout", value)
    assert str(caught.value) == f"idle_timeout must be 0 or more seconds, not {shown}."


@pytest.mark.parametrize("value", [float("nan"), "NaN", " nan "])
def test_nan_is_refused_with_one_sentence(value):
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("idle_timeout", value)
    assert str(caught.value) == f"idle_timeout must be {SECONDS} or 'never', not NaN."


@pytest.mark.parametrize(
    "value, shown",
    [
        ("abc", "'abc'"),
        ("", "''"),
        (True, "true"),
        (False, "false"),
        ([], "[]"),
        (2_592_000.5, "2592000.5"),
        (1e308, "1e+308"),
        ("1e308", "'1e308'"),
        ("1e309", "'1e309'"),
        pytest.param(10**400, repr(10**400)[:60] + "… (401 characters)", id="10**400"),
        pytest.param(10**5000, "a number with thousands of digits", id="10**5000"),
        pytest.param(-(10**5000), "a number with thousands of digits", id="-10**5000"),
        pytest.param("9" * 10_000_000, "'" + "9" * 59 + "… (10000002 characters)", id="10-MB-string"),
    ],
)
def test_a_bad_timeout_is_refused_with_one_sentence_and_a_short_excerpt(value, shown):
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("idle_timeout", value)
    assert str(caught.value) == f"idle_timeout must be {SECONDS} or 'never', not {shown}."


def test_a_missing_timeout_says_a_number_is_needed():
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("release_timeout", None, allow_inf=False)
    assert str(caught.value) == f"release_timeout needs a value: {SECONDS}."


@pytest.mark.parametrize("value, shown", [(math.inf, "inf"), ("inf", "'inf'"), ("never", "'never'")])
def test_never_is_refused_where_infinity_is_not_allowed(value, shown):
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("release_timeout", value, allow_inf=False)
    assert str(caught.value) == f"release_timeout must be a finite number of seconds, not {shown}."


def test_an_overflowing_number_is_too_large_not_never_where_never_is_not_allowed():
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("release_timeout", "1e309", allow_inf=False)
    assert str(caught.value) == f"release_timeout must be {SECONDS}, not '1e309'."


def test_the_maximum_follows_the_unit_so_hours_stop_at_720():
    hours = config.MAX_TIMEOUT_S / 3600
    in_hours = {"allow_inf": False, "unit": "hours", "maximum": hours}
    assert config.validate_timeout("--keep-videos-hours", "720", **in_hours) == 720
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("--keep-videos-hours", 720.5, **in_hours)
    assert str(caught.value) == (
        "--keep-videos-hours must be a number of hours from 0 to 720 (30 days), not 720.5."
    )


def test_an_unbounded_size_still_refuses_overflow_and_infinity():
    size = {"allow_inf": False, "unit": "GiB", "maximum": math.inf}
    assert config.validate_timeout("GPU_PIN_LIMIT_GB", "1e308", **size) == 1e308
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("GPU_PIN_LIMIT_GB", "1e309", **size)
    assert str(caught.value) == "GPU_PIN_LIMIT_GB must be a finite number of GiB, 0 or more, not '1e309'."
    with pytest.raises(InvalidSetting) as caught:
        config.validate_timeout("GPU_PIN_LIMIT_GB", "never", **size)
    assert str(caught.value) == "GPU_PIN_LIMIT_GB must be a finite number of GiB, not 'never'."


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("GPU_IDLE_TIMEOUT", "1e309", f"GPU_IDLE_TIMEOUT must be {SECONDS} or 'never', not '1e309'."),
        ("GPU_IDLE_TIMEOUT", "2592001", f"GPU_IDLE_TIMEOUT must be {SECONDS} or 'never', not '2592001'."),
        ("GPU_RELEASE_TIMEOUT", "inf", "GPU_RELEASE_TIMEOUT must be a finite number of seconds, not 'inf'."),
        ("GPU_RELEASE_TIMEOUT", "1e308", f"GPU_RELEASE_TIMEOUT must be {SECONDS}, not '1e308'."),
        ("GPU_PIN_LIMIT_GB", "inf", "GPU_PIN_LIMIT_GB must be a finite number of GiB, not 'inf'."),
    ],
)
def test_the_environment_is_bounded_like_every_other_interface(name, value, message):
    with pytest.raises(InvalidSetting) as caught:
        Settings.from_env({name: value})
    assert str(caught.value) == message


def test_settings_refuse_a_missing_or_unbounded_timeout_and_accept_never_for_idle():
    with pytest.raises(InvalidSetting) as caught:
        Settings(idle_timeout=None)
    assert str(caught.value) == f"idle_timeout needs a value: {SECONDS} or 'never'."
    with pytest.raises(InvalidSetting) as caught:
        Settings().with_overrides(release_timeout=1e308)
    assert str(caught.value) == f"release_timeout must be {SECONDS}, not 1e+308."
    assert Settings(idle_timeout="never", release_timeout=2_592_000).idle_timeout == math.inf


def test_bool_and_device_messages_quote_only_an_excerpt():
    huge = "y" * 1_000_000
    with pytest.raises(InvalidSetting) as caught:
        config.validate_bool("offload_after_use", huge)
    shown = f"'{'y' * 59}… (1000002 characters)"
    assert str(caught.value) == f"offload_after_use must be true or false, not {shown}."
    with pytest.raises(InvalidSetting) as caught:
        config.validate_device("GPU_DEVICE", huge)
    assert str(caught.value) == f"GPU_DEVICE must be 'cpu', 'cuda' or 'cuda:N', not {shown}."


def test_overrides_are_validated_and_none_keeps_the_environment():
    settings = Settings.from_env({"GPU_IDLE_TIMEOUT": "30"})
    assert settings.with_overrides(idle_timeout=None).idle_timeout == 30
    assert settings.with_overrides(idle_timeout=5).idle_timeout == 5
    with pytest.raises(InvalidSetting):
        settings.with_overrides(release_timeout=-1)


def test_settings_repr_names_the_fields():
    assert "idle_timeout=60.0" in repr(Settings())


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"NVIDIA_VISIBLE_DEVICES": "1"}, "1"),
        ({"NVIDIA_VISIBLE_DEVICES": "0,2"}, "0,2"),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, ""),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, None),
        ({"NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"}, None),
        ({}, None),
    ],
)
def test_nvidia_visible_devices_is_honoured_on_bare_metal(monkeypatch, env, expected):
    monkeypatch.setattr(config, "_in_container", lambda: False)
    before = env.get("CUDA_VISIBLE_DEVICES")
    assert config.apply_visible_devices(env) == expected
    assert env.get("CUDA_VISIBLE_DEVICES") == (before if expected is None else expected)


def test_nvidia_visible_devices_is_left_to_the_container_runtime(monkeypatch):
    monkeypatch.setattr(config, "_in_container", lambda: True)
    env = {"NVIDIA_VISIBLE_DEVICES": "1"}
    assert config.apply_visible_devices(env) is None
    assert "CUDA_VISIBLE_DEVICES" not in env


@pytest.fixture
def fresh_default():
    reset_gpu_manager()
    yield
    reset_gpu_manager()


def test_get_gpu_manager_returns_one_manager_configured_from_the_environment(monkeypatch, fresh_default):
    monkeypatch.setenv("GPU_IDLE_TIMEOUT", "120")
    monkeypatch.setenv("GPU_RELEASE_TIMEOUT", "600")
    monkeypatch.setenv("GPU_DEVICE", "cpu")
    manager = get_gpu_manager()
    assert (manager.idle_timeout, manager.release_timeout, str(manager.device)) == (120, 600, "cpu")
    assert get_gpu_manager(idle_timeout=5) is manager
    assert manager.idle_timeout == 120


def test_get_gpu_manager_arguments_override_the_environment(monkeypatch, fresh_default):
    monkeypatch.setenv("GPU_IDLE_TIMEOUT", "120")
    manager = get_gpu_manager(idle_timeout=60, device="cpu", offload_after_use=False)
    assert (manager.idle_timeout, manager.offload_after_use) == (60, False)


def test_get_gpu_manager_with_a_bad_environment_names_the_variable(monkeypatch, fresh_default):
    monkeypatch.setenv("GPU_IDLE_TIMEOUT", "abc")
    with pytest.raises(InvalidSetting, match="GPU_IDLE_TIMEOUT"):
        get_gpu_manager()


def test_public_names_match_all():
    public = {
        name
        for name, value in vars(gpu_control).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(gpu_control.__all__) == public
    for name in gpu_control.__all__:
        assert getattr(gpu_control, name) is not None


def test_memory_probe_on_a_cpu_device_reports_zeros_and_unknowns():
    import torch

    from gpu_control.memory import device_name, read_memory

    reading = read_memory(torch.device("cpu"))
    assert (reading.allocated, reading.reserved, reading.free, reading.total) == (0, 0, None, None)
    assert device_name(torch.device("cpu")) is None


def test_the_default_pin_budget_is_half_of_the_containers_memory_limit(monkeypatch):
    import io

    from gpu_control import weights

    monkeypatch.setattr(weights.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 2**22)

    def fake_open(path, *args, **kwargs):
        if path == "/sys/fs/cgroup/memory.max":
            return io.StringIO(f"{8 * 2**30}\n")
        raise FileNotFoundError(path)

    monkeypatch.setattr(weights, "open", fake_open, raising=False)
    assert weights.pin_limit_bytes({}) == 4 * 2**30
    monkeypatch.setattr(weights, "open", lambda path, *a, **k: io.StringIO("max\n"), raising=False)
    assert weights.pin_limit_bytes({}) == 8 * 2**30


def test_minus_zero_is_zero():
    value = config.validate_timeout("idle_timeout", "-0")
    assert (value, math.copysign(1.0, value)) == (0.0, 1.0)

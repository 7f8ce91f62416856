"""Settings from the environment, validated in one place; the process-wide manager."""

from __future__ import annotations

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

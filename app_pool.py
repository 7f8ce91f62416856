"""The app's models: the ``--pipeline`` flags, the pipelines they name, and the GPU pool they share.

    specs = parse_pipeline_specs(["talk=mypkg.talk:make", "mypkg.other:make"])  # in load_config
    pool_settings = read_pool_settings(os.environ, device=settings.device)        # in load_config
    pipelines = load_pipelines(specs)              # name -> pipeline, in the order given
    pool = build_pool(pool_settings, settings, pipelines)

Every pipeline becomes one model of a `GPUPool`, named by ``NAME=`` or by the pipeline's own
``name``, with the app's timeouts. Each refusal is an `InvalidSetting` (or a `PipelineError`)
whose sentence names the flag or variable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpu_control import GPUPool, InvalidSetting, Settings
from gpu_control.pool_devices import PoolSettings, parse_devices
from gpu_control.security import excerpt

if TYPE_CHECKING:
    from pipelines import Pipeline

__all__ = [
    "POOL_VARIABLES",
    "PipelineSpec",
    "build_pool",
    "describe_pool",
    "load_pipelines",
    "parse_pipeline_specs",
    "read_pool_settings",
]

POOL_VARIABLES = (
    "GPU_DEVICES",
    "GPU_BUDGET_GB",
    "GPU_RESERVE_GB",
    "GPU_HOST_BUDGET_GB",
    "GPU_WAIT_TIMEOUT",
    "GPU_SHARE_DIR",
)
"""The pool's environment variables."""

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What `GPUPool.add` accepts as a model name (it appears in URLs)."""

_NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class PipelineSpec:
    """One ``--pipeline`` flag: ``NAME=module:attr`` or ``module:attr``.

    Attributes:
        target: ``module:attr``, as `pipelines.load_pipeline` takes it.
        name: the model's name; None: the pipeline's own ``name``.
    """

    target: str
    name: str | None = None


def parse_pipeline_specs(values: Sequence[str] | None) -> tuple[PipelineSpec, ...]:
    """Read the ``--pipeline`` flags (the module is imported later, by `load_pipelines`).

    Args:
        values: each flag's text; None or empty: the built-in pipeline.

    Returns:
        The specs, in the order given.

    Raises:
        InvalidSetting: a ``NAME=`` that is not a model name, or a name given twice.
    """
    specs = []
    for value in values or ():
        name, sep, target = str(value).strip().partition("=")
        if not sep:
            specs.append(PipelineSpec(name))
            continue
        if not MODEL_NAME.fullmatch(name.strip()):
            raise InvalidSetting(
                f"--pipeline {excerpt(value)}: the model name before '=' must be {_NAME_RULE}."
            )
        specs.append(PipelineSpec(target.strip(), name.strip()))
    _refuse_twice([spec.name for spec in specs if spec.name is not None])
    return tuple(specs)


def _refuse_twice(names: Sequence[str]) -> None:
    """Refuse a model name used by two ``--pipeline`` flags."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidSetting(
                f"Two --pipeline flags name the model {name!r}: give each its own name with "
                "--pipeline NAME=module:attr."
            )
        seen.add(name)


def read_pool_settings(environ: Mapping[str, str], *, device: str | None = None) -> PoolSettings:
    """The pool's settings from ``GPU_DEVICES`` … ``GPU_SHARE_DIR``, each refusal naming its variable.

    Args:
        environ: the environment.
        device: the one device ``GPU_DEVICE`` or ``--device`` chose (None: auto); the pool's
            device when ``GPU_DEVICES`` is unset.

    Returns:
        The settings (``devices`` None: every visible CUDA device, else the CPU).

    Raises:
        InvalidSetting: a value that cannot be used; the sentence names the variable (a
            device that does not exist here is named by its value).
    """
    env = {name: environ.get(name, "") for name in POOL_VARIABLES}
    if device is not None and not env["GPU_DEVICES"].strip():
        parse_devices(device)  # refused in its own words: it came from GPU_DEVICE or --device
        env["GPU_DEVICES"] = device
    return PoolSettings.from_env(env)


def load_pipelines(specs: Sequence[PipelineSpec]) -> dict[str, Pipeline]:
    """Import the pipelines the flags name (the built-in one when there are none).

    Returns:
        ``{model name: pipeline}`` in the order of the flags.

    Raises:
        PipelineError: a module or attribute cannot be loaded (see `pipelines.load_pipeline`).
        InvalidSetting: a pipeline's own name cannot name a model, or two models share a name.
    """
    from pipelines import default_pipeline, load_pipeline

    if not specs:
        pipeline = default_pipeline()
        return {pipeline.name: pipeline}
    loaded: list[tuple[str, Pipeline]] = []
    for spec in specs:
        pipeline = load_pipeline(spec.target)
        name = spec.name
        if name is None:
            name = str(getattr(pipeline, "name", ""))
            if not MODEL_NAME.fullmatch(name):
                raise InvalidSetting(
                    f"The pipeline of --pipeline {excerpt(spec.target)} is named {excerpt(name)}, which "
                    f"cannot name a model ({_NAME_RULE}): name it with --pipeline NAME={spec.target}."
                )
        loaded.append((name, pipeline))
    _refuse_twice([name for name, _ in loaded])
    return dict(loaded)


def build_pool(
    pool_settings: PoolSettings, settings: Settings, pipelines: Mapping[str, Pipeline]
) -> GPUPool:
    """Build the pool and add one model per pipeline, with the app's timeouts (nothing is loaded).

    Raises:
        InvalidSetting: a device or budget the pool cannot use.
    """
    pool = GPUPool(**pool_settings.pool_kwargs())
    for name, pipeline in pipelines.items():
        pool.add(
            name,
            pipeline.load,
            idle_timeout=settings.idle_timeout,
            release_timeout=settings.release_timeout,
            offload_after_use=settings.offload_after_use,
        )
    return pool


def describe_pool(pool: GPUPool) -> str:
    """The pool for the start-up line: its models, and each device with its budget."""
    status = pool.get_status()
    names = ", ".join(repr(name) for name in pool.names())
    devices = ", ".join(
        f"{device['device']} (budget {device['budget_gb']:.2f} GB)" for device in status["devices"]
    )
    return f"model{'s' if len(pool) != 1 else ''} {names} on {devices}"

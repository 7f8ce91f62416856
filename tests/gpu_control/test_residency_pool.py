"""Component residency in a pool: components stay while the device's budget has room, leave least
recently used first, and leave first of all when another model waits for the room.

The device is emulated (the CPU with real copies): the engine's bytes and the pool's charges are
exact, so the tests compare them to the byte.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gpu_control import ComponentWeights, GPUPool, GPUResourceManager

GIB = 2**30
MIB = 2**20
SIZES = {"encoder": MIB // 4, "transformer": MIB // 2, "decoder": MIB // 8}  # 1, 2 and 0.5 MiB
WORKING = MIB // 2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blocks(sizes: dict[str, int]) -> nn.ModuleDict:
    """A model whose components hold exactly ``sizes`` float32 values each."""
    torch.manual_seed(0)
    return nn.ModuleDict({name: nn.Linear(n, 1, bias=False) for name, n in sizes.items()})


X = {name: torch.ones(1, n) for name, n in SIZES.items()}


@functools.cache
def expected(name: str) -> torch.Tensor:
    """The plain model's output (computed under the tests' thread count: same reduction order)."""
    with torch.no_grad():
        return blocks(SIZES)[name](X[name])


def pool_of(budget_mib: float, **kwargs: Any) -> tuple[GPUPool, GPUResourceManager]:
    pool = GPUPool(devices=["emulated:0"], budget_gb=budget_mib * MIB / GIB, **kwargs)
    manager = pool.add(
        "big", lambda: blocks(SIZES), working_gb=WORKING / GIB, residency="components",
        offload_after_use=False,
    )
    return pool, manager


def run(manager: GPUResourceManager, model: Any, name: str) -> None:
    """Run one component; its output is bit-identical to the plain model's; the budget holds."""
    with torch.no_grad():
        assert torch.equal(model[name](X[name]), expected(name)), name
    check_budget(manager)


def check_budget(manager: GPUResourceManager) -> None:
    pool = manager._admission.pool  # type: ignore[union-attr]
    device = pool.get_status()["devices"][0]
    assert device["used_gb"] <= device["budget_gb"]
    weights = manager._weights
    assert isinstance(weights, ComponentWeights)
    entry = manager._admission.entry  # type: ignore[union-attr]
    # the charge covers what is on the device: the largest component + working + the extra granted
    assert entry.charge == weights.charge_bytes + WORKING + weights.extra
    assert weights.device_bytes <= weights.charge_bytes + weights.extra


def places(manager: GPUResourceManager) -> dict[str, str]:
    return manager.get_status()["components"]


def used_mib(pool: GPUPool) -> float:
    return pool.get_status()["devices"][0]["used_gb"] * GIB / MIB


def test_with_room_for_all_every_component_stays_and_is_charged() -> None:
    pool, manager = pool_of(8)
    for _ in range(3):
        with manager.use() as model:
            for name in SIZES:
                run(manager, model, name)
            assert manager.get_status()["components"] == {name: "gpu" for name in SIZES}
            assert used_mib(pool) == 3.5 + 0.5  # the three components + working
            assert manager.get_status()["on_device_gb"] * GIB / MIB == 3.5
    swaps = manager._weights.swaps
    assert swaps == 3  # each component came in once; the later leases moved nothing
    manager.force_offload()
    assert used_mib(pool) == 0 and manager._weights.extra == 0  # the offload gave every byte back
    with manager.use() as model:
        run(manager, model, "encoder")
        assert used_mib(pool) == 2 + 0.5  # charged its largest component again, until more come in
    pool.close()


def test_with_room_for_two_the_least_recently_used_component_leaves() -> None:
    pool, manager = pool_of(3.5)  # largest (2) + working (0.5) + 1 MiB of extra room
    with manager.use() as model:
        run(manager, model, "encoder")
        run(manager, model, "transformer")
        assert used_mib(pool) == 3.5  # encoder kept: 1 MiB of extra room
        run(manager, model, "decoder")  # no room for it too: the encoder (least recently used) leaves
        assert places(manager) == {"encoder": "cpu", "transformer": "gpu", "decoder": "gpu"}
        assert used_mib(pool) == 3.0  # the extra room the encoder no longer needs is given back
        run(manager, model, "encoder")  # the transformer is now the least recently used
        assert places(manager) == {"encoder": "gpu", "transformer": "cpu", "decoder": "gpu"}
        assert used_mib(pool) == 2.5
        run(manager, model, "decoder")
        run(manager, model, "transformer")  # the encoder leaves; then there is room for the decoder
        assert places(manager) == {"encoder": "cpu", "transformer": "gpu", "decoder": "gpu"}
        assert used_mib(pool) == 3.0
    pool.close()


def test_a_waiter_makes_the_extra_components_leave_while_the_lease_goes_on() -> None:
    pool, manager = pool_of(5, wait_timeout=20)
    small = pool.add(  # 1 + 0.5 MiB
        "small", lambda: blocks({"x": MIB // 4}), working_gb=WORKING / GIB, offload_after_use=False
    )
    done = threading.Event()
    errors: list[BaseException] = []

    def use_small() -> None:
        try:
            with small.use() as model, torch.no_grad():
                model["x"](torch.ones(1, MIB // 4))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
        finally:
            done.set()

    with manager.use() as model:
        for name in SIZES:
            run(manager, model, name)
        assert used_mib(pool) == 4.0  # 1.5 MiB free: not enough for the small model
        thread = threading.Thread(target=use_small)
        thread.start()
        assert done.wait(10), "the waiter was not admitted while the components model was leased"
        thread.join()
        assert not errors, errors
        # the extras left (least recently used first); the decoder, entered last, stayed
        assert places(manager) == {"encoder": "cpu", "transformer": "cpu", "decoder": "gpu"}
        assert manager._weights.extra == 0
        assert used_mib(pool) == 2.5 + 1.5  # big's base charge + the small model (idle on the device)
        run(manager, model, "decoder")
        run(manager, model, "transformer")  # room again (nobody waits): kept with the decoder
        assert places(manager) == {"encoder": "cpu", "transformer": "gpu", "decoder": "gpu"}
        assert used_mib(pool) == 2.5 + 0.5 + 1.5
        run(manager, model, "encoder")  # room for two of three: the decoder (least recently used) leaves
        assert places(manager) == {"encoder": "gpu", "transformer": "gpu", "decoder": "cpu"}
        assert used_mib(pool) == 5  # the budget, never more
    assert pool.get_status()["waiting"] == []
    pool.close()


def test_trim_keeps_the_current_and_running_components_and_gives_back_the_rest() -> None:
    given: list[int] = []
    weights = ComponentWeights(blocks(SIZES), torch.device("cpu"), engine=_emulated)
    weights.room, weights.give_back = (lambda n: True), given.append
    weights.to_device()
    for name in SIZES:
        with torch.no_grad():
            assert torch.equal(weights.model[name](X[name]), expected(name))
    assert weights.components() == {name: "gpu" for name in SIZES}
    assert weights.extra == 1.5 * MIB
    assert weights.trim() == 1.5 * MIB and given == [1.5 * MIB]
    assert weights.components() == {"encoder": "cpu", "transformer": "cpu", "decoder": "gpu"}
    assert weights.trim() == 0
    with torch.no_grad():
        assert torch.equal(weights.model["encoder"](X["encoder"]), expected("encoder"))
    weights.to_host()
    assert weights.extra == 0 and sum(given) == weights.size_bytes - 2 * MIB
    weights.release()


def test_without_a_pool_one_component_at_a_time_as_before() -> None:
    weights = ComponentWeights(blocks(SIZES), torch.device("cpu"), engine=_emulated)
    weights.to_device()
    for name in SIZES:
        with torch.no_grad():
            assert torch.equal(weights.model[name](X[name]), expected(name))
        assert [n for n, where in weights.components().items() if where == "gpu"] == [name]
    assert weights.extra == 0 and weights.trim() == 0
    weights.release()


def _emulated(model: Any, device: torch.device, **kwargs: Any) -> Any:
    from gpu_control import attach

    return attach(model, device, emulate_device=True, **kwargs)

"""Component residency: one top-level component on the device at a time, same outputs as a whole model.

The device is emulated (the CPU with real copies), so every component swap moves bytes and the
engine's ``device_bytes`` say exactly what is on the "device". A recording engine sums the device
bytes of every component after each move, so the peak is measured, not inferred.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from gpu_control import ComponentWeights, GPUPool, GPUResourceManager, InvalidSetting, ModelWeights, attach
from gpu_control.residency import OWN, named_components

from .model_builders import sd_pipeline

GIB = 2**30
CPU = torch.device("cpu")
emulated = functools.partial(attach, emulate_device=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (a second only adds OpenMP overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """An engine (emulated unless told otherwise) that records, after each move of any part, which
    parts are on the device and the sum of their device bytes."""

    def __init__(self, emulate: bool = True) -> None:
        self.emulate = emulate
        self.parts: list[tuple[Any, ModelWeights]] = []
        self.samples: list[tuple[frozenset[int], int]] = []

    def __call__(self, model: Any, device: torch.device, **kwargs: Any) -> ModelWeights:
        recorder = self

        class Recorded(ModelWeights):
            def to_device(self) -> Any:
                moved = super().to_device()
                recorder.sample()
                return moved

            def to_host(self) -> Any:
                moved = super().to_host()
                recorder.sample()
                return moved

        weights = Recorded(model, device, emulate_device=self.emulate, **kwargs)
        self.parts.append((model, weights))
        return weights

    def sample(self) -> None:
        on = frozenset(i for i, (_, w) in enumerate(self.parts) if w.device_bytes)
        self.samples.append((on, sum(w.device_bytes for _, w in self.parts)))

    @property
    def peak(self) -> int:
        return max(nbytes for _, nbytes in self.samples)

    def most_at_once(self) -> int:
        return max(len(on) for on, _ in self.samples)


# ---------------------------------------------------------------------------- a tiny Stable Diffusion




IMAGE = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def run(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline end to end, then the VAE through encode() (diffusers' apply_forward_hook)."""
    with torch.no_grad():
        images = pipe(
            "ab c",
            num_inference_steps=2,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        latents = pipe.vae.encode(IMAGE.to(pipe._execution_device)).latent_dist.mean
    return {"images": images.cpu(), "latents": latents.cpu()}


def sd_sizes(pipe: Any) -> dict[str, int]:
    return {
        name: sum(t.nbytes for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()])
        for name in ("vae", "text_encoder", "unet")
    }


def test_a_pipeline_with_component_residency_gives_the_whole_model_outputs_one_component_at_a_time() -> None:
    whole = GPUResourceManager(device="cpu", engine=emulated, auto_monitor=False, load_func=sd_pipeline)
    with whole.use() as pipe:
        expected = run(pipe)
    assert whole.get_status()["components"] == {"vae": "cpu", "text_encoder": "cpu", "unet": "cpu"}
    whole.force_release()

    recorder = Recorder()
    manager = GPUResourceManager(
        device="cpu", engine=recorder, auto_monitor=False, load_func=sd_pipeline, residency="components"
    )
    assert manager.get_status()["residency"] == "components"
    seen: list[dict[str, str]] = []
    for cycle in range(3):
        with manager.use() as pipe:
            if cycle == 0:
                # a part restored holds its master buffers' bytes on the device
                sizes = {name: part.host_bytes for name, part in manager._weights.parts.items()}
                assert sizes.keys() == {"vae", "text_encoder", "unet"}
                assert all(0 <= sizes[n] - raw < 256 * 300 for n, raw in sd_sizes(pipe).items())
                sample = lambda *_: seen.append(manager.get_status()["components"])  # noqa: E731
                pipe.unet.register_forward_pre_hook(sample)
            assert manager.get_status()["components"] == {"vae": "cpu", "text_encoder": "cpu", "unet": "cpu"}
            outputs = run(pipe)
            status = manager.get_status()
            assert status["components"] == {"vae": "gpu", "text_encoder": "cpu", "unet": "cpu"}
            assert status["on_device_gb"] == sizes["vae"] / GIB
        for name in expected:
            assert torch.equal(outputs[name], expected[name]), (cycle, name)
        after = manager.get_status()
        assert (after["model_location"], after["on_device_gb"]) == ("cpu", 0.0)
        assert set(after["components"].values()) == {"cpu"}
    # sampled from the status while the unet runs: only the unet is on the device
    assert seen[0] == {"vae": "cpu", "text_encoder": "cpu", "unet": "gpu"}
    assert all(view == seen[0] for view in seen)
    assert recorder.most_at_once() == 1
    assert recorder.peak == max(sizes.values())
    assert manager.get_status()["cpu_cache_gb"] == sum(sizes.values()) / GIB
    weights = manager._weights
    assert isinstance(weights, ComponentWeights)
    # per lease: text encoder, unet, vae (decode), vae again for encode() is already there
    assert weights.swaps == 9
    manager.force_release()


def test_vae_encode_and_decode_enter_the_vae_through_its_hf_hook() -> None:
    pipe = sd_pipeline()
    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: pipe, residency="components"
    )
    with manager.use():
        latents = torch.zeros(1, 4, 8, 8)
        with torch.no_grad():
            pipe.text_encoder(torch.tensor([[0, 8, 7, 1]]))
            assert manager.get_status()["components"]["text_encoder"] == "gpu"
            pipe.vae.decode(latents)
            assert manager.get_status()["components"] == {"vae": "gpu", "text_encoder": "cpu", "unet": "cpu"}
            pipe.text_encoder(torch.tensor([[0, 8, 7, 1]]))
            pipe.vae.encode(IMAGE)
            assert manager.get_status()["components"]["vae"] == "gpu"
            weights = manager._weights
            assert weights.where(next(pipe.vae.parameters())) == "device"
            assert weights.where(next(pipe.text_encoder.parameters())) == "host"
            assert pipe._execution_device == CPU  # our hook's execution device: the compute device
    manager.force_release()


def test_release_removes_every_hook_and_leaves_the_users_hook_in_place() -> None:
    hooks = pytest.importorskip("accelerate.hooks")

    class Doubling(hooks.ModelHook):
        """Doubles the output (exact in floating point) and counts the calls."""

        def __init__(self) -> None:
            self.calls = 0

        def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return output * 2

    torch.manual_seed(0)
    model = nn.ModuleDict({"first": nn.Linear(8, 8), "second": nn.Linear(8, 4)})
    doubling = Doubling()
    hooks.add_hook_to_module(model["second"], doubling)
    user_forward = model["second"].forward
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model["second"](model["first"](x))
    assert doubling.calls == 1
    before = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.items()}

    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: model, residency="components"
    )
    for _ in range(3):
        with manager.use() as leased, torch.no_grad():
            assert leased["second"]._hf_hook.inner is doubling  # ours, chaining the user's
            hidden = leased["first"](x)
            assert manager.get_status()["components"] == {"first": "gpu", "second": "cpu"}
            assert torch.equal(leased["second"](hidden), expected)  # the user's hook still doubles
            assert manager.get_status()["components"] == {"first": "cpu", "second": "gpu"}
    assert doubling.calls == 4
    with torch.no_grad():  # between leases the hooks are inert: the model runs on its host copy
        assert torch.equal(model["second"](model["first"](x)), expected)
    assert manager.get_status()["components"] == {"first": "cpu", "second": "cpu"}
    assert manager._weights.device_bytes == 0
    manager.force_release()
    assert model["second"]._hf_hook is doubling
    assert model["second"].forward == user_forward
    assert "_hf_hook" not in model["first"].__dict__
    after = {name: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for name, m in model.items()}
    assert after == before
    with torch.no_grad():
        assert torch.equal(model["second"](model["first"](x)), expected)


def test_a_pipeline_released_under_component_residency_has_no_hooks_left() -> None:
    pipe = sd_pipeline()
    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: pipe, residency="components"
    )
    with manager.use():
        assert all(hasattr(getattr(pipe, n), "_hf_hook") for n in ("vae", "text_encoder", "unet"))
    manager.force_release()
    for name in ("vae", "text_encoder", "unet"):
        module = getattr(pipe, name)
        assert not hasattr(module, "_hf_hook"), name
        assert not module._forward_pre_hooks and not module._forward_hooks, name


def test_a_component_called_from_inside_another_stays_until_that_one_returns() -> None:
    class Outer(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.inner(x))

    torch.manual_seed(0)
    inner = nn.Linear(4, 4)
    model = {"outer": Outer(inner), "inner": inner}  # shared: the two become one component
    assert [name for name, _ in named_components(model)] == ["outer", "inner"]
    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: model, residency="components"
    )
    with manager.use():
        assert manager.get_status()["components"] == {"outer+inner": "cpu"}

    torch.manual_seed(0)
    helper = nn.Linear(4, 4)
    calls: list[dict[str, str]] = []

    class Caller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = helper(x)  # another component, entered while this one runs
            calls.append(other.get_status()["components"])
            return self.proj(y)

    other = GPUResourceManager(
        device="cpu",
        engine=emulated,
        auto_monitor=False,
        load_func=lambda: {"caller": Caller(), "helper": helper},
        residency="components",
    )
    with other.use() as parts, torch.no_grad():
        parts["caller"](torch.ones(1, 4))
        assert calls == [{"caller": "gpu", "helper": "gpu"}]
        parts["helper"](torch.ones(1, 4))
        assert other.get_status()["components"] == {"caller": "cpu", "helper": "gpu"}
    manager.force_release()
    other.force_release()


def test_a_component_whose_forward_raises_is_no_longer_counted_as_running() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = {"failing": Failing(), "other": nn.Linear(2, 2)}
    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: model, residency="components"
    )
    with manager.use() as parts, torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            parts["failing"](torch.ones(1, 2))
        parts["other"](torch.ones(1, 2))
        assert manager.get_status()["components"] == {"failing": "cpu", "other": "gpu"}
    manager.force_release()


def test_a_single_module_runs_child_by_child_and_keeps_its_own_tensors_for_the_lease() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.full((8,), 0.5))
            self.embed = nn.Linear(8, 8)
            self.head = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x) * self.scale)

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = net(x)
    recorder = Recorder()
    manager = GPUResourceManager(
        device="cpu", engine=recorder, auto_monitor=False, load_func=lambda: net, residency="components"
    )
    for _ in range(3):
        with manager.use() as model, torch.no_grad():
            assert manager.get_status()["components"] == {"embed": "cpu", "head": "cpu", OWN: "gpu"}
            assert torch.equal(model(x), expected)
            assert manager.get_status()["components"] == {"embed": "cpu", "head": "gpu", OWN: "gpu"}
    assert recorder.peak == 8 * 4 + (8 * 8 + 8) * 4  # (own) + one Linear
    assert manager._weights.charge_bytes == recorder.peak
    manager.force_release()
    assert not net.embed._forward_pre_hooks and "_hf_hook" not in net.head.__dict__


def test_a_child_tied_to_the_modules_own_tensor_stays_with_it_for_the_lease() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 4, bias=False)
            self.body = nn.Linear(4, 4)
            self.weight = self.head.weight  # the module's own tensor, tied to a child's

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x) @ self.weight)

    torch.manual_seed(0)
    model = Tied()
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = model(x)
    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: model, residency="components"
    )
    with manager.use() as leased, torch.no_grad():
        assert torch.equal(leased(x), expected)
        assert manager.get_status()["components"] == {"body": "gpu", OWN: "gpu"}  # head: with (own)
        assert manager._weights.where(leased.weight) == "device"
    manager.force_release()


def test_tied_embeddings_across_components_become_one_component() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        expected = model(ids).logits
    manager = GPUResourceManager(
        device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: model, residency="components"
    )
    for _ in range(3):
        with manager.use() as leased, torch.no_grad():
            assert torch.equal(leased(ids).logits, expected)
            assert manager.get_status()["components"] == {"model+lm_head": "gpu"}
            assert leased.lm_head.weight is leased.model.embed_tokens.weight
    manager.force_release()


def test_residency_is_validated() -> None:
    with pytest.raises(InvalidSetting, match="residency must be 'model' or 'components'"):
        GPUResourceManager(device="cpu", residency="layers")
    status = GPUResourceManager(device="cpu", auto_monitor=False).get_status()
    assert (status["residency"], status["components"], status["on_device_gb"]) == ("model", {}, 0.0)


def test_whole_model_residency_reports_every_top_level_module_and_its_bytes_on_the_device() -> None:
    model = {"a": nn.Linear(4, 4), "b": nn.Linear(4, 2)}
    manager = GPUResourceManager(device="cpu", engine=emulated, auto_monitor=False, load_func=lambda: model)
    with manager.use():
        status = manager.get_status()
        assert status["components"] == {"a": "gpu", "b": "gpu"}
        assert status["on_device_gb"] == manager._weights.device_bytes / GIB > 0
        assert status["residency"] == "model"
    assert manager.get_status()["components"] == {"a": "cpu", "b": "cpu"}
    manager.force_release()


# ---------------------------------------------------------------------------- in a pool


def blocks(sizes: dict[str, int]) -> nn.ModuleDict:
    """A model whose components hold exactly ``sizes`` float32 values each."""
    torch.manual_seed(0)
    return nn.ModuleDict({name: nn.Linear(n, 1, bias=False) for name, n in sizes.items()})


MIB = 2**20
SIZES = {"encoder": MIB // 4, "transformer": MIB // 2, "decoder": MIB // 8}  # 1, 2 and 0.5 MiB


def test_a_pool_charges_a_components_model_its_largest_component_plus_working() -> None:
    pool = GPUPool(devices=["emulated:0"], budget_gb=8 * MIB / GIB)
    manager = pool.add("big", lambda: blocks(SIZES), working_gb=MIB / GIB, residency="components")
    with manager.use() as model, torch.no_grad():
        model["transformer"](torch.ones(1, SIZES["transformer"]))
        device = pool.get_status()["devices"][0]
        assert device["used_gb"] == 3 * MIB / GIB  # the transformer (2 MiB) + working (1 MiB)
        assert manager.get_status()["on_device_gb"] == 2 * MIB / GIB
    pool.close()


def test_a_pool_model_larger_than_the_budget_runs_with_component_residency(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = GPUPool(devices=["emulated:0"], budget_gb=3 * MIB / GIB)
    manager = pool.add("big", lambda: blocks(SIZES), working_gb=0.5 * MIB / GIB)
    x = {name: torch.ones(1, n) for name, n in SIZES.items()}
    expected = {name: blocks(SIZES)[name](x[name]) for name in SIZES}
    with caplog.at_level(logging.INFO, logger="gpu_control.residency"):
        for _ in range(3):
            with manager.use() as model, torch.no_grad():
                for name in SIZES:
                    assert torch.equal(model[name](x[name]), expected[name])
                status = pool.get_status()
                assert status["models"]["big"]["residency"] == "components"
                # the transformer (2 MiB) + working (0.5 MiB) charged, and the decoder (0.5 MiB) kept
                # with the room left; the encoder left (least recently used): the budget, never more
                assert status["devices"][0]["used_gb"] == 3 * MIB / GIB
                assert status["models"]["big"]["components"] == {
                    "encoder": "cpu", "transformer": "gpu", "decoder": "gpu"
                }
    assert "'big' (0.00 GiB) is larger than every device budget: it runs with component residency" in (
        caplog.text
    )
    pool.close()


def test_a_pool_model_whose_largest_component_does_not_fit_still_fails_clearly() -> None:
    from gpu_control import OutOfMemory

    pool = GPUPool(devices=["emulated:0"], budget_gb=1.5 * MIB / GIB)
    manager = pool.add("big", lambda: blocks(SIZES))
    with pytest.raises(OutOfMemory, match="can never fit"):
        with manager.use():
            pass
    pool.close()


def test_a_pool_model_that_fits_whole_keeps_whole_model_residency() -> None:
    pool = GPUPool(devices=["emulated:0"], budget_gb=8 * MIB / GIB)
    manager = pool.add("small", lambda: blocks(SIZES))
    with manager.use():
        status = manager.get_status()
        assert status["residency"] == "model"
        assert status["on_device_gb"] == 3.5 * MIB / GIB
    pool.close()


# ---------------------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
def test_on_cuda_a_pipeline_runs_one_component_at_a_time_with_the_whole_model_outputs() -> None:
    whole = GPUResourceManager(device="cuda", auto_monitor=False, load_func=sd_pipeline)
    with whole.use() as pipe:
        expected = run(pipe)
    whole.force_release()
    recorder = Recorder(emulate=False)
    manager = GPUResourceManager(
        device="cuda", engine=recorder, auto_monitor=False, load_func=sd_pipeline, residency="components"
    )
    for _ in range(3):
        with manager.use() as pipe:
            assert pipe._execution_device.type == "cuda"  # our hook's: latents are made on the GPU
            outputs = run(pipe)
            assert manager.get_status()["components"] == {"vae": "gpu", "text_encoder": "cpu", "unet": "cpu"}
        for name in expected:
            assert torch.equal(outputs[name], expected[name]), name
    assert recorder.most_at_once() == 1
    assert recorder.peak == max(part.host_bytes for part in manager._weights.parts.values())
    manager.force_release()

"""Real model families, managed as they are: found whole, identical after any number of cycles.

Each family is built tiny in code (no hub access) and handed to a real `GPUResourceManager`, or
to a `GPUPool` on an emulated card, exactly as a load function returns it: a diffusers
pipeline, transformers models, a dict of modules, a module with accelerate hooks, a compiled
module, low-precision and quantized weights. The device is emulated (the CPU with real copies),
so every restore and offload moves bytes. The load function runs the model once; then, through
``CYCLES`` restore/offload cycles, every parameter and buffer must lie in an engine device
buffer while leased and in the master copy after the offload, and the forward pass must give
bit-identical outputs on the device and on the master copy afterwards.

A family the engine cannot manage is an ``xfail(strict=True)`` whose reason says what it misses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpu_control import GPUPool, GPUResourceManager, ModelWeights, attach

from .model_builders import sd_pipeline

CYCLES = 3
GIB = 2**30
CPU = torch.device("cpu")
emulated = functools.partial(attach, emulate_device=True)

Outputs = dict[str, torch.Tensor]
Manage = Callable[[Callable[[], Any]], GPUResourceManager]


# ---------------------------------------------------------------------------- the driver


def tensors_of(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Every distinct parameter and buffer of ``modules`` as torch lists them (a tied one once)."""
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            found.setdefault(id(tensor), tensor)
    return list(found.values())


def non_persistent_buffers(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """The buffers left out of the state dict (rotary tables, position ids), by qualified name."""
    return {
        f"{prefix}.{name}".lstrip("."): sub._buffers[name]
        for module in modules
        for prefix, sub in module.named_modules()
        for name in sorted(sub._non_persistent_buffers_set)
        if sub._buffers.get(name) is not None
    }


def byte_count(modules: list[nn.Module]) -> int:
    """Bytes of the model's weights, each distinct tensor once."""
    return sum(tensor.nbytes for tensor in tensors_of(modules))


@dataclass
class Family:
    """A model as its load function builds it, the modules it holds and one forward pass.

    ``modules`` names the model's modules independently of the engine's own search;
    ``expected_bytes`` defaults to the bytes of their distinct parameters and buffers;
    ``while_leased`` runs extra checks on the device inside every lease.
    """

    build: Callable[[], Any]
    modules: Callable[[Any], list[nn.Module]]
    forward: Callable[[Any], Outputs]
    expected_bytes: Callable[[Any], int] | None = None
    while_leased: Callable[[Any, ModelWeights], None] | None = None
    reference: Outputs = field(default_factory=dict)
    loaded: list[torch.Tensor] = field(default_factory=list)
    size: int = -1

    def load(self) -> Any:
        """The load function the manager gets: builds, runs once and keeps what it saw."""
        model = self.build()
        with torch.no_grad():
            self.reference = self.forward(model)
        self.loaded = [tensor.detach().clone() for tensor in tensors_of(self.modules(model))]
        self.size = (self.expected_bytes or (lambda m: byte_count(self.modules(m))))(model)
        return model

    def assert_as_loaded(self, model: Any) -> None:
        """Every tensor holds its loaded values, the unused ones too (outputs would not tell)."""
        tensors = tensors_of(self.modules(model))
        assert len(tensors) == len(self.loaded)
        assert all(torch.equal(now, then) for now, then in zip(tensors, self.loaded))


def assert_identical(outputs: Outputs, expected: Outputs) -> None:
    assert outputs.keys() == expected.keys()
    for name, tensor in expected.items():
        assert outputs[name].dtype == tensor.dtype, name
        assert torch.equal(outputs[name], tensor), name


def placed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the engine lays out in its buffers (quantized ones move by a plain ``.to()``)."""
    return [tensor for tensor in tensors if not tensor.is_quantized]


def cycle(manage: Manage, family: Family) -> Any:
    """Restore and offload ``CYCLES`` times, checking placement, outputs and size; returns the model."""
    manager = manage(family.load)
    for _ in range(CYCLES):
        with manager.use() as model:
            weights = manager._weights
            assert weights is not None
            tensors = placed(tensors_of(family.modules(model)))
            assert [weights.where(t) for t in tensors] == ["device"] * len(tensors)
            family.assert_as_loaded(model)
            with torch.no_grad():
                assert_identical(family.forward(model), family.reference)
            if family.while_leased is not None:
                family.while_leased(model, weights)
        status = manager.get_status()
        assert status["model_location"] == "cpu"
        assert status["model_size_gb"] == family.size / GIB
        assert [weights.where(t) for t in tensors] == ["host"] * len(tensors)
        family.assert_as_loaded(model)
    with torch.no_grad():
        assert_identical(family.forward(model), family.reference)  # on the master copy too
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run these tiny models on one thread: a second one only adds OpenMP overhead (and spins
    for milliseconds per op when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["manager", "pool"])
def manage(request: pytest.FixtureRequest) -> Iterator[Manage]:
    """Hands a load function to a standalone manager, or to a pool on one emulated card."""
    if request.param == "manager":
        managers: list[GPUResourceManager] = []

        def standalone(load: Callable[[], Any]) -> GPUResourceManager:
            managers.append(
                GPUResourceManager(device="cpu", engine=emulated, auto_monitor=False, load_func=load)
            )
            return managers[-1]

        yield standalone
        for manager in managers:
            manager.force_release()
    else:
        pool = GPUPool(devices=["emulated:0"])
        yield lambda load: pool.add("model", load)
        pool.close()


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- diffusers


def test_a_diffusers_pipeline_runs_identically_after_cycles(manage: Manage) -> None:
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    image = seeded(1, 3, 16, 16).clamp(-1, 1)
    build = sd_pipeline

    def forward(pipe: Any) -> Outputs:
        result = pipe(
            "ab c",
            num_inference_steps=2,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return {"images": result.images, "latents": pipe.vae.encode(image).latent_dist.mean}

    def while_leased(pipe: Any, weights: ModelWeights) -> None:
        assert pipe.tokenizer("ab c").input_ids == [0, 8, 7, 1]  # the pipeline tokenizes with our vocab
        extra = non_persistent_buffers([pipe.vae, pipe.text_encoder, pipe.unet])
        assert [name.endswith("embeddings.position_ids") for name in extra] == [True]
        assert [weights.where(t) for t in extra.values()] == ["device"]

    def components(pipe: Any) -> list[nn.Module]:
        return [pipe.vae, pipe.text_encoder, pipe.unet]

    cycle(manage, Family(build, components, forward, while_leased=while_leased))


def test_a_wan_video_transformer_and_its_rotary_tables_come_back_identical(manage: Manage) -> None:
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "WanTransformer3DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no WanTransformer3DModel")
    hidden, timestep, text = seeded(1, 4, 2, 4, 4), torch.tensor([10]), seeded(1, 3, 16, seed=1)

    def build() -> Any:
        torch.manual_seed(0)
        return diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=1,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=16,
        ).eval()

    def forward(model: Any) -> Outputs:
        out = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text)
        return {"sample": out.sample}

    def while_leased(model: Any, weights: ModelWeights) -> None:
        rope = non_persistent_buffers([model])
        assert sorted(rope) == ["rope.freqs_cos", "rope.freqs_sin"]
        assert [weights.where(t) for t in rope.values()] == ["device", "device"]

    cycle(manage, Family(build, lambda m: [m], forward, while_leased=while_leased))


# ---------------------------------------------------------------------------- transformers


def test_a_llama_with_tied_embeddings_stays_tied_and_identical(manage: Manage) -> None:
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))

    def build() -> Any:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model

    def while_leased(model: Any, weights: ModelWeights) -> None:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert weights.where(model.lm_head.weight) == "device"
        rotary = non_persistent_buffers([model])
        assert sorted(rotary) == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
        assert [weights.where(t) for t in rotary.values()] == ["device", "device"]

    family = Family(
        build, lambda m: [m], lambda m: {"logits": m(input_ids=ids).logits}, while_leased=while_leased
    )
    model = cycle(manage, family)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    saved = sum(t.nbytes for t in model.state_dict().values())  # lists the tied matrix twice
    rotary = sum(t.nbytes for t in non_persistent_buffers([model]).values())  # not in the state dict
    assert family.size == saved - 64 * 16 * 2 + rotary  # the 64 x 16 bf16 matrix counted once


def test_a_t5_encoder_keeps_its_shared_embedding_shared(manage: Manage) -> None:
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))

    def build() -> Any:
        torch.manual_seed(0)
        config = transformers.T5Config(
            vocab_size=64,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
        return transformers.T5EncoderModel(config).eval()

    def while_leased(model: Any, weights: ModelWeights) -> None:
        assert model.encoder.embed_tokens.weight is model.shared.weight
        assert weights.where(model.encoder.embed_tokens.weight) == "device"

    family = Family(
        build,
        lambda m: [m],
        lambda m: {"hidden": m(input_ids=ids).last_hidden_state},
        while_leased=while_leased,
    )
    cycle(manage, family)


def test_a_wav2vec2_model_with_a_weight_norm_parametrization_comes_back_identical(manage: Manage) -> None:
    transformers = pytest.importorskip("transformers")
    audio = seeded(2, 400)

    def build() -> Any:
        torch.manual_seed(0)
        config = transformers.Wav2Vec2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(8, 8),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
        return transformers.Wav2Vec2Model(config).eval()

    def while_leased(model: Any, weights: ModelWeights) -> None:
        conv = model.encoder.pos_conv_embed.conv
        assert torch.nn.utils.parametrize.is_parametrized(conv, "weight")
        norm = conv.parametrizations.weight
        assert [weights.where(norm.original0), weights.where(norm.original1)] == ["device", "device"]

    family = Family(
        build, lambda m: [m], lambda m: {"hidden": m(audio).last_hidden_state}, while_leased=while_leased
    )
    cycle(manage, family)


# ---------------------------------------------------------------------------- containers


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))


@pytest.mark.parametrize("shape", ["dict", "list"])
def test_modules_in_a_dict_or_list_are_found_with_a_tie_across_them(manage: Manage, shape: str) -> None:
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))

    def build() -> Any:
        torch.manual_seed(0)
        embed, head, norm = nn.Embedding(32, 16), nn.Linear(16, 32, bias=False), nn.LayerNorm(16)
        head.weight = embed.weight  # tied across two top-level modules
        block = nn.Linear(16, 16)
        block.register_buffer("gate", torch.linspace(0, 1, 16), persistent=False)
        if shape == "dict":
            return {"embed": embed, "blocks": [block, norm], "heads": (head,), "norm_again": norm}
        return [embed, [block, norm], head, norm]

    def parts(model: Any) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        if shape == "dict":
            return model["embed"], model["blocks"][0], model["blocks"][1], model["heads"][0]
        return model[0], model[1][0], model[1][1], model[2]

    def forward(model: Any) -> Outputs:
        embed, block, norm, head = parts(model)
        return {"logits": head(norm(block(embed(ids)) * block.gate))}

    def while_leased(model: Any, weights: ModelWeights) -> None:
        embed, block, _, head = parts(model)
        assert head.weight is embed.weight
        assert list(non_persistent_buffers([block])) == ["gate"]
        assert weights.where(block.gate) == "device"

    family = Family(build, lambda m: list(parts(m)), forward, while_leased=while_leased)
    cycle(manage, family)
    assert family.size == (32 * 16 + 16 * 16 + 16 + 16 + 16 + 16) * 4


# ---------------------------------------------------------------------------- accelerate


def test_accelerate_hooks_stay_attached_and_fire_in_every_cycle(manage: Manage) -> None:
    hooks = pytest.importorskip("accelerate.hooks")
    x = seeded(2, 8)

    class Doubling(hooks.ModelHook):
        """Doubles the output (exact in floating point) and counts the calls."""

        def __init__(self) -> None:
            self.calls = 0

        def post_forward(self, module: nn.Module, output: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return output * 2

    def build() -> nn.Module:
        model = mlp()
        hooks.add_hook_to_module(model[0], hooks.AlignDevicesHook(execution_device=CPU, io_same_device=True))
        hooks.add_hook_to_module(model, Doubling())
        return model

    calls: list[int] = []

    def while_leased(model: nn.Module, weights: ModelWeights) -> None:
        assert isinstance(model[0]._hf_hook, hooks.AlignDevicesHook)
        calls.append(model._hf_hook.calls)

    family = Family(build, lambda m: [m], lambda m: {"y": m(x)}, while_leased=while_leased)
    model = cycle(manage, family)
    assert calls == [2, 3, 4]  # the load's reference run, then one per lease
    hooks.remove_hook_from_submodules(model)  # detached, the model is the plain one again
    with torch.no_grad():
        assert torch.equal(model(x) * 2, family.reference["y"])
        assert torch.equal(model(x), mlp()(x))


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "accelerate.cpu_offload() replaces every parameter with a meta tensor and keeps the weights "
        "in each AlignDevicesHook's weights_map (a dict of CPU tensors); the engine looks only at "
        "module parameters and buffers, skips the meta ones and so finds 0 bytes and moves nothing"
    ),
)
def test_a_cpu_offloaded_model_is_found_whole(manage: Manage) -> None:
    accelerate = pytest.importorskip("accelerate")
    x = seeded(2, 8)
    expected = byte_count([mlp()])

    def build() -> nn.Module:
        return accelerate.cpu_offload(mlp(), execution_device=CPU)

    family = Family(build, lambda m: [m], lambda m: {"y": m(x)}, expected_bytes=lambda m: expected)
    manager = manage(family.load)
    with manager.use() as model, torch.no_grad():
        assert manager.get_status()["model_size_gb"] == expected / GIB
        assert [manager._weights.where(p) for p in model.parameters()] == ["device"] * 4
        assert_identical(family.forward(model), family.reference)


# ---------------------------------------------------------------------------- torch.compile


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.register_buffer("offset", torch.full((4,), 0.25), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.offset


def test_a_compiled_module_reads_the_weights_where_the_engine_puts_them(manage: Manage) -> None:
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    x = seeded(3, 8)

    def build() -> nn.Module:
        return torch.compile(Residual().eval(), backend="aot_eager")

    def while_leased(compiled: nn.Module, weights: ModelWeights) -> None:
        eager = compiled._orig_mod
        with torch.no_grad():
            before = compiled(x)
            eager.net[0].weight.mul_(2)  # a change on the device must show in the compiled graph
            assert torch.equal(compiled(x), eager(x))
            assert not torch.equal(compiled(x), before)
            eager.net[0].weight.mul_(0.5)  # exact: back to the loaded values

    family = Family(build, lambda c: [c._orig_mod], lambda c: {"y": c(x)}, while_leased=while_leased)
    compiled = cycle(manage, family)
    assert type(compiled).__name__ == "OptimizedModule"
    assert family.size == byte_count([Residual()])


# ---------------------------------------------------------------------------- low precision, quantized


class LowPrecision(nn.Module):
    """fp8 and int8 weights with scales, quantized tensors and a complex rotary table."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.fp8 = nn.Parameter(
            torch.randn(16, 8, generator=generator).to(torch.float8_e4m3fn), requires_grad=False
        )
        self.register_buffer("fp8_scale", torch.tensor(0.5))
        int8 = torch.randint(-128, 128, (16, 16), generator=generator, dtype=torch.int8)
        self.register_buffer("int8", int8)
        self.register_buffer("int8_scale", torch.full((16,), 0.01))
        quantized = torch.quantize_per_tensor(torch.randn(4, 16, generator=generator), 0.05, 3, torch.qint8)
        self.register_buffer("qint8", quantized)
        self.quint8 = nn.Parameter(
            torch.quantize_per_tensor(torch.randn(4, 4, generator=generator), 0.1, 128, torch.quint8),
            requires_grad=False,
        )
        self.register_buffer("freqs", torch.polar(torch.ones(4), torch.arange(4.0)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.fp8.float() * self.fp8_scale)
        h = F.linear(h, self.int8.float() * self.int8_scale[:, None])
        h = F.linear(h, self.qint8.dequantize())
        return torch.view_as_real(F.linear(h, self.quint8.dequantize()) * self.freqs)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_fp8_int8_and_quantized_weights_come_back_bit_identical(manage: Manage) -> None:
    x = seeded(2, 8)
    host: dict[str, int] = {}

    def build() -> nn.Module:
        model = LowPrecision()
        host.update(qint8=model.qint8.data_ptr(), quint8=model.quint8.data_ptr())
        return model

    qint8, quint8 = torch.qint8, torch.quint8

    def while_leased(model: LowPrecision, weights: ModelWeights) -> None:
        assert (model.fp8.dtype, model.int8.dtype, model.freqs.dtype) == (
            torch.float8_e4m3fn,
            torch.int8,
            torch.complex64,
        )
        # quantized tensors take the fallback path: a real copy of the same kind, put back in place
        assert model.qint8.data_ptr() != host["qint8"] and model.quint8.data_ptr() != host["quint8"]
        assert (model.qint8.dtype, model.qint8.q_scale(), model.qint8.q_zero_point()) == (qint8, 0.05, 3)
        assert isinstance(model.quint8, nn.Parameter)
        assert (model.quint8.dtype, model.quint8.q_scale(), model.quint8.q_zero_point()) == (quint8, 0.1, 128)

    family = Family(build, lambda m: [m], lambda m: {"y": m(x)}, while_leased=while_leased)
    model = cycle(manage, family)
    assert (model.qint8.data_ptr(), model.quint8.data_ptr()) == (host["qint8"], host["quint8"])
    # fp8 128 + scale 4 + int8 256 + scales 64 + qint8 64 + quint8 16 + complex64 32
    assert family.size == 564


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "torch.ao.quantization.quantize_dynamic() packs each Linear's int8 weight and bias into a "
        "torch.ScriptObject (LinearPackedParams._packed_params), neither a parameter nor a buffer: "
        "the engine never sees the packed weights (272 of this model's 400 bytes; it finds only the "
        "LayerNorm's 128) and they never leave the host"
    ),
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_a_dynamically_quantized_model_is_found_whole(manage: Manage) -> None:
    x = seeded(2, 8)

    def build() -> nn.Module:
        return torch.ao.quantization.quantize_dynamic(mlp(), {nn.Linear}, dtype=torch.qint8)

    def packed_bytes(model: nn.Module) -> int:
        dynamic = torch.ao.nn.quantized.dynamic.Linear
        packed = [m._weight_bias() for m in model.modules() if isinstance(m, dynamic)]
        return sum(t.nbytes for weight_bias in packed for t in weight_bias) + byte_count([model])

    family = Family(build, lambda m: [m], lambda m: {"y": m(x)}, expected_bytes=packed_bytes)
    manager = manage(family.load)
    with manager.use() as model, torch.no_grad():
        assert_identical(family.forward(model), family.reference)
    assert family.size > byte_count([model])  # the packed weights are there to be found
    assert manager.get_status()["model_size_gb"] == family.size / GIB

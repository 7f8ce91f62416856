"""Benchmark: real architectures from their published configurations, with random weights.

    python bench/models.py                          # CPU: scaled down, emulated device (~1-2 min)
    python bench/models.py --layers 30 --text-layers 24 --decoder-layers 28   # full shapes (GPU)

Two tables, in Markdown:

1. A Wan2.1-T2V-1.3B-shaped ``WanPipeline`` (the 1.3B transformer's published configuration with
   ``--layers`` of its 30 blocks, a UMT5-XXL-shaped text encoder with ``--text-layers`` of 24 blocks
   and a 1024-word vocabulary instead of 256k, the Wan VAE at its published size) run end to end:
   ours (``GPUResourceManager(residency="components")``: one component on the device at a time,
   restored from the master copy in few large copies, offloaded by pointer swap) against diffusers'
   ``enable_model_cpu_offload()`` (per-tensor ``.to()`` each way, every call). On a machine without
   CUDA the device is emulated (a second CPU copy): diffusers' own offload then moves nothing
   (``.to("cpu")`` is a no-op: its row shows the hooks' cost only), so a third row emulates its
   copies faithfully: per tensor, a new allocation and a copy to the device on entry, and the same
   back to the host on exit.
2. A Qwen2-1.5B-shaped decoder (``--decoder-layers`` of its 28 blocks, tied embeddings): the
   engine's whole-model restore and offload against ``model.to(device)`` and back.

Every way runs the same seeded inputs; the outputs are checked bit-identical across ways.
"""

from __future__ import annotations

import abc
import argparse
import functools
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.utils import logging as diffusers_logging  # noqa: E402

from gpu_control import GPUResourceManager  # noqa: E402
from gpu_control.weights import ModelWeights  # noqa: E402

MB = 1e6
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
WHERE = "cuda" if CUDA else "emulated device (CPU, real copies)"


# ---------------------------------------------------------------------------- the architectures


def wan_pipeline(layers: int, text_layers: int) -> Any:
    """Wan2.1-T2V-1.3B's published configurations (the transformer and the VAE as published)."""
    import diffusers
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 1024)}}
    raw = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    ).to(torch.bfloat16)
    for name, param in transformer.named_parameters():  # as from_pretrained(torch_dtype=bf16) keeps them
        if any(keep in name.split(".") for keep in transformer._keep_in_fp32_modules):
            param.data = param.data.float()
    text_config = transformers.UMT5Config(
        vocab_size=1024,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=text_layers,
        num_heads=64,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_gated_act=True,
        tie_word_embeddings=False,
    )
    text_encoder = transformers.UMT5EncoderModel(text_config).to(torch.bfloat16).eval()
    vae = diffusers.AutoencoderKLWan()  # the published Wan2.1 VAE configuration; float32 as in its examples
    pipe = diffusers.WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen2_decoder(layers: int) -> nn.Module:
    """Qwen2-1.5B's published configuration (tied embeddings), bf16, with ``layers`` of its 28 blocks."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


def run_wan(pipe: Any, steps: int) -> torch.Tensor:
    return pipe(
        "w3 w4 w5",
        height=64,
        width=64,
        num_frames=1,
        num_inference_steps=steps,
        guidance_scale=1.0,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).frames


# ---------------------------------------------------------------------------- measuring moves


class Moves:
    """Times and bytes of every move, and the most bytes on the device at once."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.inward: list[bool] = []  # to the device (True) or to the host
        self.copied = 0
        self.on_device = 0
        self.peak = 0

    def add(self, seconds: float, copied: int, delta: int, inward: bool) -> None:
        self.seconds.append(seconds)
        self.inward.append(inward)
        self.copied += copied
        self.on_device += delta
        self.peak = max(self.peak, self.on_device)

    def reset(self) -> None:
        self.seconds, self.inward, self.copied, self.peak = [], [], 0, self.on_device


def timed_engine(moves: Moves) -> Callable[..., ModelWeights]:
    """The engine, recording each component's moves (emulated on a CPU)."""

    class Timed(ModelWeights):
        def to_device(self) -> Any:
            before = self.device_bytes
            moved = super().to_device()
            moves.add(moved.seconds, moved.bytes_copied, self.device_bytes - before, True)
            return moved

        def to_host(self) -> Any:
            before = self.device_bytes
            moved = super().to_host()
            moves.add(moved.seconds, moved.bytes_copied, self.device_bytes - before, False)
            return moved

    return functools.partial(Timed, emulate_device=not CUDA)


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        found.setdefault(id(tensor), tensor)
    return list(found.values())


def naive_move(module: nn.Module, to_device: bool) -> tuple[float, int]:
    """``module.to(device)`` (or back); on a CPU, emulated as what it does: a new tensor and a copy each."""
    start = time.perf_counter()
    if CUDA:
        module.to(DEVICE if to_device else "cpu")
        torch.cuda.synchronize()
    else:
        with torch.no_grad():
            for tensor in unique_tensors(module):
                tensor.data = tensor.data.clone()
    return time.perf_counter() - start, sum(t.nbytes for t in unique_tensors(module))


class EmulatedModelOffload:
    """diffusers' model offload on an emulated device: entering a component moves the previous one
    to the host and this one to the device, each with a per-tensor ``.to()`` (emulated as above)."""

    def __init__(self, pipe: Any, moves: Moves) -> None:
        self.moves = moves
        self.current: nn.Module | None = None
        self.handles: list[Any] = []
        for name in ("text_encoder", "transformer", "vae"):
            module = getattr(pipe, name)
            self.handles.append(module.register_forward_pre_hook(lambda m, _a: self.enter(m)))
            module._hf_hook = self  # diffusers' apply_forward_hook: vae.decode() calls pre_forward
        self.modules = [getattr(pipe, n) for n in ("text_encoder", "transformer", "vae")]

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.enter(module)
        return args, kwargs

    def enter(self, module: nn.Module) -> None:
        if module is self.current:
            return
        if self.current is not None:
            seconds, nbytes = naive_move(self.current, to_device=False)
            self.moves.add(seconds, nbytes, -nbytes, False)
        seconds, nbytes = naive_move(module, to_device=True)
        self.moves.add(seconds, nbytes, nbytes, True)
        self.current = module

    def end(self) -> None:
        """The pipeline's ``maybe_free_model_hooks()``: the last component goes back to the host."""
        if self.current is not None:
            seconds, nbytes = naive_move(self.current, to_device=False)
            self.moves.add(seconds, nbytes, -nbytes, False)
            self.current = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for module in self.modules:
            del module._hf_hook


# ---------------------------------------------------------------------------- the runs


class StepTimer:
    """Times each forward of the transformer (registered after the residency hooks: swaps excluded)."""

    def __init__(self, module: nn.Module) -> None:
        self.seconds: list[float] = []
        self._start = 0.0
        self.handles = [
            module.register_forward_pre_hook(lambda *_: self._begin()),
            module.register_forward_hook(lambda *_: self._end()),
        ]

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Way(abc.ABC):
    """One way of running the pipeline: set up, one timed call, torn down; the figures of every call."""

    reference: torch.Tensor | None = None  # the first call's output (ours): every way must give it

    def __init__(self, name: str, pipe: Any) -> None:
        self.name = name
        self.pipe = pipe
        self.calls: list[float] = []
        self.steps: list[float] = []
        self.moves: list[Moves] = []
        self.identical = True

    @abc.abstractmethod
    def setup(self, moves: Moves) -> Callable[[], None]:
        """Prepare this way of running the pipeline; return what undoes it."""

    def call(self, steps: int) -> None:
        moves = Moves()
        teardown = self.setup(moves)
        timer = StepTimer(self.pipe.transformer)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                out = self.run(steps)
            if CUDA:
                torch.cuda.synchronize()
        finally:
            self.calls.append(time.perf_counter() - start)
            timer.remove()
            teardown()
        self.steps.append(statistics.median(timer.seconds))
        self.moves.append(moves)
        if Way.reference is None:
            Way.reference = out.cpu()
        self.identical &= torch.equal(out.cpu(), Way.reference)

    def forget_timings(self) -> None:
        """Drop the warm-up round's figures."""
        self.calls, self.steps, self.moves = [], [], []

    def run(self, steps: int) -> torch.Tensor:
        return run_wan(self.pipe, steps)

    def row(self, instrumented: bool = True, note: str = "") -> list[str]:
        moves = self.moves[-1]
        cells = [
            self.name,
            f"{statistics.median(self.calls):.2f} s",
            f"{statistics.median(self.steps) * 1e3:.0f} ms",
        ]
        if instrumented:
            ins = [t for way in self.moves for t, inward in zip(way.seconds, way.inward) if inward]
            outs = [t for way in self.moves for t, inward in zip(way.seconds, way.inward) if not inward]
            cells += [
                str(len(moves.seconds)),
                f"{statistics.median(ins) * 1e3:.0f} / {statistics.median(outs) * 1e3:.1f} ms",
                f"{moves.copied / MB:.0f} MB",
                f"{moves.peak / MB:.0f} MB",
            ]
        else:
            cells += ["n/a"] * 4
        same = "identical outputs" if self.identical else "OUTPUTS DIFFER"
        return [*cells, f"{note}{'; ' if note else ''}{same}"]


class Ours(Way):
    def setup(self, moves: Moves) -> Callable[[], None]:
        manager = GPUResourceManager(
            device=DEVICE,
            engine=timed_engine(moves),
            auto_monitor=False,
            load_func=lambda: self.pipe,
            residency="components",
        )
        manager.preheat()  # attach (the master copy: once per load, not per call) outside the timing
        manager.force_offload()
        moves.reset()
        self.manager = manager
        return manager.force_release

    def run(self, steps: int) -> torch.Tensor:
        with self.manager.use() as pipe:
            return run_wan(pipe, steps)


class DiffusersOffload(Way):
    def setup(self, moves: Moves) -> Callable[[], None]:
        self.pipe.enable_model_cpu_offload(device=None if CUDA else "cpu")
        return self.pipe.remove_all_hooks


class EmulatedOffload(Way):
    def setup(self, moves: Moves) -> Callable[[], None]:
        offload = EmulatedModelOffload(self.pipe, moves)

        def teardown() -> None:
            offload.end()
            offload.remove()

        return teardown


def bench_pipeline(args: argparse.Namespace) -> tuple[list[list[str]], dict[str, int]]:
    pipe = wan_pipeline(args.layers, args.text_layers)
    sizes = {
        n: sum(t.nbytes for t in unique_tensors(getattr(pipe, n)))
        for n in ("text_encoder", "transformer", "vae")
    }
    ours = Ours("ours: component residency (restore + pointer-swap offload)", pipe)
    diffusers = DiffusersOffload("diffusers enable_model_cpu_offload()", pipe)
    ways: list[Way] = [ours, diffusers]
    if not CUDA:
        ways.append(
            EmulatedOffload("diffusers-style model offload, emulated (per-tensor .to() each way)", pipe)
        )
    for round_ in range(args.repeat + 1):  # interleaved: a busy machine slows every way alike
        for way in ways:
            way.call(args.steps)
            if round_ == 0:
                way.forget_timings()  # a warm-up round
            gc.collect()
    rows = [ours.row()]
    if CUDA:
        rows.append(diffusers.row(instrumented=False, note="moves not instrumented; see the time per call"))
    else:
        rows.append(
            diffusers.row(instrumented=False, note="n/a on CPU: its .to('cpu') copies nothing (hooks only)")
        )
        rows.append(ways[2].row())
    return rows, sizes


def bench_decoder(args: argparse.Namespace) -> tuple[list[list[str]], int]:
    model = qwen2_decoder(args.decoder_layers)
    ids = torch.arange(16).unsqueeze(0) + 100
    nbytes = sum(t.nbytes for t in unique_tensors(model))
    reference: list[torch.Tensor] = []  # the first output (ours, on the device): both ways must give it
    figures: dict[str, dict[str, list[float]]] = {
        way: {"in": [], "out": [], "step": [], "copied": []} for way in ("ours", "naive")
    }

    def step() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            out = model(ids.to(DEVICE)).logits
            seconds = time.perf_counter() - start
        reference[:1] = reference or [out.cpu()]
        assert torch.equal(out.cpu(), reference[0]), "a move changed the outputs"
        return seconds

    for _ in range(args.repeat):  # interleaved: a busy machine slows both alike
        moves = Moves()
        weights = timed_engine(moves)(model, DEVICE)  # the master copy: once per load, not timed
        weights.to_device()
        seconds = step()
        weights.to_host()
        ours = figures["ours"]
        ours["in"].append(moves.seconds[0])
        ours["out"].append(moves.seconds[1])
        ours["step"].append(seconds)
        ours["copied"].append(moves.copied)
        weights.release()
        gc.collect()
        naive = figures["naive"]
        seconds_in, copied_in = naive_move(model, to_device=True)
        seconds = step()
        seconds_out, copied_out = naive_move(model, to_device=False)
        naive["in"].append(seconds_in)
        naive["out"].append(seconds_out)
        naive["step"].append(seconds)
        naive["copied"].append(copied_in + copied_out)
    labels = {
        "ours": "ours: whole-model restore / offload (pointer swap)",
        "naive": "model.to(device) / .to('cpu')" + ("" if CUDA else ", emulated (per-tensor copy)"),
    }
    rows = []
    for way, values in figures.items():
        median = {key: statistics.median(v) for key, v in values.items()}
        rows.append(
            [
                labels[way],
                f"{median['in'] * 1e3:.0f} ms",
                f"{median['out'] * 1e3:.1f} ms",
                f"{median['copied'] / MB:.0f} MB",
                f"{nbytes / MB:.0f} MB",
                f"{median['step'] * 1e3:.0f} ms",
            ]
        )
    return rows, nbytes


def table(header: list[str], rows: list[list[str]]) -> Iterator[str]:
    yield "| " + " | ".join(header) + " |"
    yield "|" + "---|" * len(header)
    for cells in rows:
        yield "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="Wan transformer blocks (published: 30)")
    parser.add_argument("--text-layers", type=int, default=1, help="UMT5 encoder blocks (published: 24)")
    parser.add_argument("--decoder-layers", type=int, default=4, help="Qwen2 decoder blocks (published: 28)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per pipeline call")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per way (median shown)")
    args = parser.parse_args()
    logging.getLogger("gpu_control").setLevel(
        logging.ERROR
    )  # the bench keeps the pipeline after each release
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    start = time.perf_counter()
    rows, sizes = bench_pipeline(args)
    parts = ", ".join(f"{name} {n / MB:.0f} MB" for name, n in sizes.items())
    print(
        f"### Wan2.1-1.3B-shaped pipeline ({args.layers}/30 blocks, UMT5-XXL-shaped text encoder "
        f"{args.text_layers}/24 blocks, Wan VAE) on {WHERE}\n"
    )
    print(
        f"Components: {parts}. One call: 64x64, 1 frame, {args.steps} steps, no guidance; "
        f"median of {args.repeat}.\n"
    )
    header = [
        "way",
        "per call",
        "transformer step",
        "moves per call",
        "per move (in / out)",
        "bytes copied per call",
        "peak device bytes",
        "note",
    ]
    print("\n".join(table(header, rows)) + "\n")

    rows, nbytes = bench_decoder(args)
    print(
        f"### Qwen2-1.5B-shaped decoder ({args.decoder_layers}/28 blocks, bf16, tied embeddings, "
        f"{nbytes / MB:.0f} MB) on {WHERE}\n"
    )
    header = [
        "way",
        "to device",
        "to host",
        "bytes copied (in + out)",
        "peak device bytes",
        "step (16 tokens)",
    ]
    print("\n".join(table(header, rows)) + "\n")
    load = os.getloadavg()[0]
    print(
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f}, "
        f"{time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()

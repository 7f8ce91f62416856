"""The recommended first load: safetensors read straight into engine host buffers."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from gpu_control import GPUResourceManager, LoadError, attach, checkpoint
from gpu_control.checkpoint import load_safetensors, read_safetensors_header

CPU = torch.device("cpu")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 24).to(torch.bfloat16)
        self.lin = nn.Linear(24, 24).half()
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 40, bias=False).to(torch.bfloat16)
        self.head.weight = self.emb.weight
        self.register_buffer("positions", torch.arange(11))


def on_meta() -> Net:
    with torch.device("meta"):
        return Net()


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Net, Path]:
    torch.manual_seed(1)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = tmp_path / "net.safetensors"
    save_model(net, str(path))  # drops the tied duplicate, as the format requires
    return net, path


def assert_equal_state(got: nn.Module, expected: nn.Module) -> None:
    a, b = got.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_a_meta_model_is_filled_with_ties_kept_and_attach_reuses_the_buffers(
    source: tuple[Net, Path],
) -> None:
    net, path = source
    model = on_meta()

    result = load_safetensors(model, path)

    assert_equal_state(model, net)
    assert model.head.weight is model.emb.weight
    assert (result.tensors, result.converted, result.missing, result.unexpected) == (6, 0, (), ())
    assert result.bytes_read == sum(
        t.nbytes for t in {id(t): t for t in net.state_dict(keep_vars=True).values()}.values()
    )
    pointers = [t.data_ptr() for t in model.state_dict().values()]

    weights = attach(model, CPU, emulate_device=True)

    assert weights.stats()["adopted_bytes"] == weights.host_bytes > 0
    assert [t.data_ptr() for t in model.state_dict().values()] == pointers  # no host copy made
    weights.to_device()
    assert all(weights.where(t) == "device" for t in model.state_dict().values())
    weights.to_host()
    assert_equal_state(model, net)


def test_a_cpu_model_keeps_its_parameter_objects(source: tuple[Net, Path]) -> None:
    net, path = source
    model = Net()
    weight = model.lin.weight

    load_safetensors(model, path, workers=1)

    assert model.lin.weight is weight
    assert_equal_state(model, net)


def test_a_dtype_that_differs_from_the_model_is_converted(tmp_path: Path) -> None:
    values = torch.randn(24, 24)
    path = tmp_path / "fp32.safetensors"
    save_file({"weight": values, "bias": torch.zeros(24)}, str(path))
    with torch.device("meta"):
        model = nn.Linear(24, 24).half()

    result = load_safetensors(model, path)

    assert result.converted == 2
    assert model.weight.dtype == torch.float16 and torch.equal(model.weight, values.half())


def test_names_must_match_unless_not_strict(tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    save_file({"weight": torch.ones(3, 3), "extra": torch.ones(2)}, str(path))
    model = nn.Linear(3, 3)
    bias = model.bias.detach().clone()

    with pytest.raises(LoadError, match=r"missing \['bias'\], unexpected \['extra'\]"):
        load_safetensors(model, path)
    result = load_safetensors(model, path, strict=False)

    assert (result.missing, result.unexpected) == (("bias",), ("extra",))
    assert torch.equal(model.weight, torch.ones(3, 3)) and torch.equal(model.bias, bias)


def test_a_tensor_left_on_meta_without_data_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "lin.safetensors"
    save_file({"weight": torch.ones(3, 3), "bias": torch.ones(3)}, str(path))
    with torch.device("meta"):
        model = nn.Linear(3, 3)
        model.register_buffer("cache", torch.empty(5), persistent=False)

    with pytest.raises(LoadError, match=r"meta device with no data: \['cache'\]"):
        load_safetensors(model, path)


def test_a_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "lin.safetensors"
    save_file({"weight": torch.ones(4, 3), "bias": torch.ones(3)}, str(path))

    with pytest.raises(LoadError, match=r"'weight' has shape \[4, 3\] in the file but \[3, 3\]"):
        load_safetensors(nn.Linear(3, 3), path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"abc", "shorter than 8 bytes"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 5) + b"nope!", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_an_invalid_file_is_refused_with_a_sentence(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=message):
        read_safetensors_header(path)


def test_a_truncated_file_is_refused(source: tuple[Net, Path]) -> None:
    _, path = source
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(LoadError, match="past the end"):
        load_safetensors(on_meta(), path)


def test_many_buffers_and_chunked_parallel_reads_give_the_same_values(
    source: tuple[Net, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    net, path = source
    monkeypatch.setattr(checkpoint, "_CHUNK", 100)  # every tensor in several reads
    model = on_meta()

    load_safetensors(model, path, workers=3, bucket_bytes=1024)

    assert_equal_state(model, net)
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert len(storages) > 2
    weights = attach(model, CPU, emulate_device=True)
    assert weights.stats()["adopted_bytes"] == weights.host_bytes


def test_the_manager_loads_a_checkpoint_through_the_recommended_path(source: tuple[Net, Path]) -> None:
    net, path = source

    def load() -> Net:
        model = on_meta()
        load_safetensors(model, path)
        return model

    manager = GPUResourceManager(
        device="cpu", engine=functools.partial(attach, emulate_device=True), auto_monitor=False
    )
    with manager.use(load) as model:
        assert_equal_state(model, net)
        weights = manager._weights
        assert weights is not None and weights.stats()["adopted_bytes"] == weights.host_bytes
    assert manager.get_status()["last_transition"]["bytes_copied"] == 0


def test_short_reads_are_resumed_where_they_stopped(
    source: tuple[Net, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    net, path = source
    real_preadv = os.preadv
    calls = 0

    def at_most_seven_bytes(fd: int, views: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        return real_preadv(fd, [views[0][:7]], offset)

    monkeypatch.setattr(os, "preadv", at_most_seven_bytes)
    model = on_meta()

    load_safetensors(model, path, workers=1)

    assert calls > sum(t.nbytes for t in net.parameters()) // 7
    assert_equal_state(model, net)


def test_neighbouring_tensors_share_a_read_and_big_ones_are_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "_CHUNK", 10)
    memory = memoryview(bytearray(64))
    pieces = [(0, memory[0:4]), (4, memory[8:12]), (8, memory[16:30]), (30, memory[40:42])]

    jobs = checkpoint._read_jobs(pieces)

    assert [(at, [len(v) for v in views]) for views, at in jobs] == [
        (0, [4, 4]),
        (8, [10]),
        (18, [4]),
        (30, [2]),
    ]

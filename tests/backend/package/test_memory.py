"""Weights once: a loaded package's weights are the file's pages, ONNX Runtime reads them from
the file, and nothing holds a second dense copy (issue 25).

The model is 16 x Linear(1024, 1024): 64 MiB of weights, enough for a second copy to stand out
of RSS noise by a wide margin. Bounds are fractions of the weight bytes; the measured values
(this machine) are in the comments.
"""

from __future__ import annotations

import gc
import json
import os
import zipfile

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import nativert
from nativert._program.mapped import file_region
from nativert.backend.package.serde import dict_to_dataclass
from nativert.backend.runtime.memory import process_memory, return_freed_memory

MIB = 1 << 20


def _rss_mib() -> float:
    """RSS after handing free heap pages back (others' garbage would hide a new copy)."""
    gc.collect()
    return_freed_memory()
    return process_memory()["rss"]


class Tall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(16)))

    @staticmethod
    def with_weights(state: dict) -> Tall:
        model = Tall().eval()
        model.load_state_dict(state)
        return model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x)) * 0.5 + x
        return x


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = Tall().eval()
    x = torch.randn(4, 1024)
    path = tmp_path_factory.mktemp("memory") / "tall.pt2"
    with torch.no_grad():
        program = nativert.to_backend(torch.export.export(model, (x,)), cache_dir=None)
        nativert.save(program, path)
        expected = model(x)
    weight_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    return model, x, expected, path, weight_mib


def test_loaded_weights_are_the_files_pages_and_cost_no_memory(package):
    _, _, _, path, weight_mib = package
    before = _rss_mib()
    program = nativert.load(path)
    added = _rss_mib() - before  # read into memory: >= 64 MiB; mapped: ~1 MiB
    regions = {name: file_region(t) for name, t in program.state_dict.items()}
    assert all(r is not None and r.path == str(path) for r in regions.values()), regions
    assert added < 0.25 * weight_mib, f"loading added {added:.0f} MiB for {weight_mib:.0f}"
    # Each region is exactly the tensor's bytes in the file.
    name, tensor = next(iter(program.state_dict.items()))
    with open(path, "rb") as f:
        f.seek(regions[name].offset)
        stored = torch.frombuffer(bytearray(f.read(regions[name].nbytes)), dtype=tensor.dtype)
    assert torch.equal(stored, tensor.detach().flatten())
    read = nativert.load(path, mmap=False)
    assert all(file_region(t) is None for t in read.state_dict.values())
    for key, t in program.state_dict.items():
        assert torch.equal(t, read.state_dict[key])


def test_an_executor_over_a_package_holds_its_weights_once(package):
    _, x, expected, path, weight_mib = package
    before = _rss_mib()
    executor = nativert.Executor(nativert.load(path))
    with torch.no_grad():
        for _ in range(3):
            assert_close(executor(x), expected)
    added = _rss_mib() - before
    # ONNX Runtime maps the package's weight bytes, repacks them and drops the originals;
    # torch's mapped tensors stay unread. Measured 70 MiB for 64; torch's copy plus ORT's
    # (before issue 25) was 135.
    assert added < 1.5 * weight_mib, f"Executor added {added:.0f} MiB for {weight_mib:.0f}"


def test_a_written_mapped_weight_is_not_read_from_the_file(package):
    """Writing to a mapped weight changes this process's copy only (copy-on-write): the file
    keeps its bytes, and delegates built after the write run with the written values."""
    model, x, _, path, _ = package
    raw = path.read_bytes()
    program = nativert.load(path)
    name = "layers.3.weight"
    weight = program.state_dict[name]
    assert file_region(weight) is not None
    with torch.no_grad():
        weight.mul_(-1.0)
    assert file_region(weight) is None  # no longer the file's bytes
    assert path.read_bytes() == raw
    changed = Tall.with_weights(model.state_dict())
    with torch.no_grad():
        changed.layers[3].weight.mul_(-1.0)
        assert_close(nativert.Executor(program)(x), changed(x))
        assert_close(program.module()(x), changed(x))


def test_a_package_saved_over_a_loaded_one_does_not_change_its_answers(package, tmp_path):
    """ONNX Runtime opens the package by its path: once another file has been saved there,
    sessions built for the loaded program read the loaded weights, not the new file's."""
    model, x, expected, path, _ = package
    copy = tmp_path / "served.pt2"
    copy.write_bytes(path.read_bytes())
    relative = os.path.relpath(copy)  # a relative path works too
    loaded = nativert.load(relative)
    other = Tall.with_weights({k: -v for k, v in model.state_dict().items()})
    with torch.no_grad():
        nativert.save(nativert.to_backend(torch.export.export(other, (x,)), cache_dir=None), copy)
        assert_close(nativert.Executor(loaded)(x), expected)
        assert_close(loaded.module()(x), expected)
        assert_close(nativert.Executor(nativert.load(copy))(x), other(x))


def test_a_flipped_byte_in_a_mapped_weight_is_refused(package, tmp_path):
    _, _, _, path, _ = package
    region = file_region(nativert.load(path).state_dict["layers.5.weight"])
    assert region is not None  # mapped: the check below is the mapped path's
    raw = bytearray(path.read_bytes())
    raw[region.offset + region.nbytes // 2] ^= 0x01
    flipped = tmp_path / "flipped.pt2"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(nativert.PackageError, match="SHA-256"):
        nativert.load(flipped)


def test_compressed_weights_are_read_not_mapped(package, tmp_path):
    """A package re-zipped with compression (another tool, say) still loads, by reading."""
    _, x, expected, path, _ = package
    deflated = tmp_path / "deflated.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    program = nativert.load(deflated)
    assert all(file_region(t) is None for t in program.state_dict.values())
    with torch.no_grad():
        assert_close(nativert.Executor(program)(x), expected)


def test_a_weight_swap_returns_to_one_copy(package):
    """While a swap is staged the old and the new session both live; after commit only the
    new one does (the old session's packed weights are freed)."""
    model, x, _, path, weight_mib = package
    executor = nativert.Executor(nativert.load(path))
    with torch.no_grad():
        executor(x)
    new = {k: v * 0.5 for k, v in model.state_dict().items()}  # the caller's new weights
    before = _rss_mib()
    executor.stage_weights(new)
    staged = _rss_mib() - before  # the new session: ~1x (measured 64 MiB)
    executor.commit_weights()
    with torch.no_grad():
        for _ in range(3):
            assert_close(executor(x), Tall.with_weights(new)(x))
    after = _rss_mib() - before  # the old session is gone: measured 0.2 MiB
    assert staged > 0.5 * weight_mib, staged  # the measurement sees a copy when there is one
    assert after < 0.5 * weight_mib, f"after commit {after:.0f} MiB more than before"


def test_program_json_converts_as_torch_does(package):
    """nativert's cached converter builds what torch's `_dict_to_dataclass` builds."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass

    _, _, _, path, _ = package
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".json") and "/models/" in n]
        assert len(names) >= 2  # the top program and a segment
        for name in names:
            data = json.loads(archive.read(name))
            ours = dict_to_dataclass(schema.ExportedProgram, data)
            assert ours == _dict_to_dataclass(schema.ExportedProgram, data)

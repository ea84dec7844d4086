"""nativert.save / nativert.load: round trips, fresh processes, fallbacks, hostile files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import nativert
from nativert.backend.delegates.onnxruntime import OnnxRuntimeDelegate
from tests.conftest import assert_close
from tests.models import make

SIN_EXCLUDED = nativert.CapabilityPartitioner(exclude_ops=["aten::sin"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """split_by_sin: two ORT regions around a PyTorch sin, saved once."""
    model, inputs = make("split_by_sin")
    program = nativert.to_backend(torch.export.export(model, inputs), SIN_EXCLUDED)
    path = tmp_path_factory.mktemp("pkg") / "model.pt2"
    nativert.save(program, path)
    return model, inputs, program, path


def test_round_trip_restores_every_delegate(saved):
    model, inputs, _, path = saved
    loaded = nativert.load(path)
    loaded.validate()
    assert [m.backend_id for m in nativert.lowered_modules(loaded)] == ["onnxruntime"] * 2
    with torch.no_grad():
        expected = model(*inputs)
        assert_close(loaded.module()(*inputs), expected, what="module")
        assert_close(nativert.Executor(loaded)(*inputs), expected, what="executor")
    report = nativert.delegation_report(loaded)
    assert report.reasons["aten.sin.default"] == {"excluded by user": 1}


def test_loaded_program_can_be_saved_and_lowered_again(saved, tmp_path):
    model, inputs, _, path = saved
    loaded = nativert.load(path)
    nativert.save(loaded, tmp_path / "again.pt2")
    again = nativert.load(tmp_path / "again.pt2")
    relowered = nativert.to_backend(again)  # sin now goes to onnxruntime too
    assert len(nativert.delegate_nodes(relowered)) == 3
    with torch.no_grad():
        assert_close(relowered.module()(*inputs), model(*inputs))


def test_weights_are_stored_once_not_in_payloads(saved):
    _, _, program, path = saved
    with zipfile.ZipFile(path) as archive:
        payloads = [archive.read(n) for n in archive.namelist() if "executorch" in n]
        weight_files = [n for n in archive.namelist() if "/weights/weight_" in n]
    assert len(payloads) == 2
    assert len(weight_files) == len(program.state_dict)  # top-level weights, once each
    for name, tensor in program.state_dict.items():
        raw = tensor.detach().contiguous().numpy().tobytes()
        assert not any(raw in payload for payload in payloads), f"{name} copied into a payload"


def test_load_in_a_fresh_process_without_model_code(saved, tmp_path):
    model, (x,), _, path = saved
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, nativert\n"
        "assert 'tests' not in sys.modules\n"
        f"program = nativert.load({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(nativert.Executor(program)(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        assert_close(torch.load(tmp_path / "y.pt", weights_only=True), model(x))


class MissingOrt(OnnxRuntimeDelegate):
    def is_available(self):
        return nativert.Availability(False, "onnxruntime is not installed")


@pytest.fixture
def ort_missing():
    original = nativert.get_delegate("onnxruntime")
    nativert.register_delegate(MissingOrt(), replace=True)
    yield
    nativert.register_delegate(original, replace=True)


def test_missing_runtime_falls_back_to_reference_with_warning(saved, ort_missing):
    model, inputs, _, path = saved
    with pytest.warns(
        RuntimeWarning,
        match=r"delegate 'onnxruntime' of segment "
        r"'onnxruntime_\d' is not available here "
        r"\(onnxruntime is not installed\)",
    ):
        loaded = nativert.load(path)
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(*inputs), model(*inputs))


def test_missing_runtime_is_an_error_when_strict(saved, ort_missing):
    _, _, _, path = saved
    with pytest.raises(nativert.PackageError, match="onnxruntime is not installed.*strict"):
        nativert.load(path, strict=True)


# -- hostile and broken files -------------------------------------------------------------
class Trap:
    """Unpickling this creates a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rewrite(src: Path, dst: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = replace.get(item.filename.split("/", 1)[1], zin.read(item.filename))
            zout.writestr(item, data)


def trap_bytes(marker: Path) -> bytes:
    trap = Trap()
    trap.marker = str(marker)
    return pickle.dumps(trap)


def test_sample_inputs_are_never_unpickled(saved, tmp_path):
    model, inputs, _, path = saved
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt2"
    rewrite(path, hostile, {"data/sample_inputs/model.pt": trap_bytes(marker)})
    loaded = nativert.load(hostile)
    assert not marker.exists()
    with torch.no_grad():
        assert_close(loaded.module()(*inputs), model(*inputs))


def test_pickled_weights_are_refused(saved, tmp_path):
    _, _, _, path = saved
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(path) as archive:
        config_name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(config_name))
    fqn, entry = next(iter(config["config"].items()))
    entry["use_pickle"] = True
    hostile = tmp_path / "hostile.pt2"
    rewrite(
        path,
        hostile,
        {
            config_name.split("/", 1)[1]: json.dumps(config).encode(),
            f"data/weights/{entry['path_name']}": trap_bytes(marker),
        },
    )
    with pytest.raises(nativert.PackageError, match=rf"weight '{fqn}' .* stored as a pickle"):
        nativert.load(hostile)
    assert not marker.exists()


def test_truncated_corrupted_missing_and_foreign_files(saved, tmp_path):
    _, _, _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(nativert.PackageError, match=r"truncated.pt2 is not a readable .pt2"):
        nativert.load(truncated)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(nativert.PackageError, match=r"garbage.pt2 is not a readable .pt2"):
        nativert.load(garbage)
    with pytest.raises(nativert.PackageError, match=r"nope.pt2: no such file"):
        nativert.load(tmp_path / "nope.pt2")
    plain = tmp_path / "plain.pt2"
    model, inputs = make("mlp")
    torch.export.save(torch.export.export(model, inputs), plain)
    with pytest.raises(nativert.PackageError, match="no nativert manifest"):
        nativert.load(plain)


def test_wrong_format_version(saved, tmp_path):
    _, _, _, path = saved
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("nativert/manifest.json"))
        manifest = json.loads(archive.read(name))
    manifest["format_version"] = 99
    newer = tmp_path / "newer.pt2"
    rewrite(path, newer, {name.split("/", 1)[1]: json.dumps(manifest).encode()})
    with pytest.raises(
        nativert.PackageError, match="package format 99; this nativert reads format 1"
    ):
        nativert.load(newer)


def test_torch_export_load_of_a_delegated_program_says_what_to_do(saved):
    _, inputs, _, path = saved
    plain = torch.export.load(path)
    with pytest.raises(
        nativert.DelegateCallError, match="use nativert.load|load with nativert.load"
    ):
        plain.module()(*inputs)


def test_loaded_program_re_exports(saved):
    model, inputs, _, path = saved
    loaded = nativert.load(path)
    again = torch.export.export(loaded.module(), inputs)
    again.validate()
    assert len(nativert.delegate_nodes(again)) == 2
    with torch.no_grad():
        assert_close(again.module()(*inputs), model(*inputs))

"""nativert.save / nativert.load: round trips, fresh processes, fallbacks (hostile files:
test_untrusted.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest
import torch

import nativert
from nativert.backend.delegates.onnxruntime import OnnxRuntimeDelegate
from tests.backend.package.crafting import MANIFEST, edit_json, rewrite, trap_bytes
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
    # sin now goes to onnxruntime too
    relowered = nativert.to_backend(again, compare_with_pytorch=False)
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


# -- constants (hostile ones: test_untrusted.py) -------------------------------------------
class WithConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.offset = torch.randn(3)  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return self.fc(x) + self.offset


@pytest.fixture(scope="module")
def saved_with_constant(tmp_path_factory):
    model, x = WithConstant(), torch.randn(2, 3)
    path = tmp_path_factory.mktemp("const") / "model.pt2"
    nativert.save(nativert.to_backend(torch.export.export(model, (x,))), path)
    return model, x, path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_pickle": True}, r"constant 'offset' of 'model' is stored as a pickle"),
        ({"path_name": "custom_obj_0"}, r"constant 'offset' of 'model' is a custom object"),
    ],
    ids=["pickled_constant", "custom_object"],
)
def test_pickled_constants_and_custom_objects_are_refused(
    saved_with_constant, tmp_path, change, message
):
    model, x, path = saved_with_constant
    with torch.no_grad():
        assert_close(nativert.load(path).module()(x), model(x))  # the untouched file loads
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_constants_config.json"))
        config = json.loads(archive.read(name))
    entry = config["config"]["offset"]
    entry.update(change)
    hostile = tmp_path / "hostile.pt2"
    rewrite(
        path,
        hostile,
        {
            name.split("/", 1)[1]: json.dumps(config).encode(),
            f"data/constants/{entry['path_name']}": trap_bytes(marker),
        },
    )
    with pytest.raises(nativert.PackageError, match=message):
        nativert.load(hostile)
    assert not marker.exists()


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


class ScaledWrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


@pytest.fixture
def exported_wrapper():
    """A wrapper around an owning lowered module, exported: program weight names
    (inner.fc1_weight) differ from the segment's (fc1.weight)."""
    model, inputs = make("mlp")
    lowered = nativert.to_backend("onnxruntime", torch.export.export(model, inputs))
    return model, inputs, torch.export.export(ScaledWrapper(lowered), inputs)


def test_executor_updates_weights_of_an_exported_wrapper(exported_wrapper):
    model, inputs, program = exported_wrapper
    executor = nativert.Executor(program)
    new = {k: torch.randn_like(v) for k, v in executor.weights().items()}
    executor.update_weights(new)
    model.load_state_dict(
        {k.removeprefix("inner.").replace("_", ".", 1): v for k, v in new.items()}
    )
    with torch.no_grad():
        assert_close(executor(*inputs), model(*inputs) * 2)


def test_exported_wrapper_saves_and_loads(exported_wrapper, tmp_path):
    model, inputs, program = exported_wrapper
    nativert.save(program, tmp_path / "w.pt2")
    loaded = nativert.load(tmp_path / "w.pt2")
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(*inputs), model(*inputs) * 2)


def test_package_from_another_delegate_version_falls_back(tmp_path):
    model, inputs = make("mlp")
    nativert.save(nativert.to_backend(torch.export.export(model, inputs)), tmp_path / "m.pt2")

    def older(manifest):
        manifest["delegates"][0]["delegate_version"] = "0-old"

    edit_json(tmp_path / "m.pt2", tmp_path / "old.pt2", MANIFEST, older)
    with pytest.warns(RuntimeWarning, match=r"written by delegate version '0-old'"):
        loaded = nativert.load(tmp_path / "old.pt2")
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(*inputs), model(*inputs))
    with pytest.raises(nativert.PackageError, match="'0-old'.*strict"):
        nativert.load(tmp_path / "old.pt2", strict=True)

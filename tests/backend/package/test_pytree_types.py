"""Packages whose outputs are registered pytree types (a dataclass, a transformers ModelOutput)
load anywhere: the type comes back where it is registered, a PackageError names the import to
add where it is not, `plain_containers=True` gives dicts and tuples, and no module a file
names is ever imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from enum import Enum
from pathlib import Path

import pytest
import torch

import nativert
from nativert.backend.package.treespecs import check_treespec, leaf_paths
from nativert.backend.package.untrusted import Refused
from tests.backend.package.crafting import edit_json
from tests.conftest import assert_close

OUTPUTS_MODULE = "nativert_test_outputs"  # registers its dataclass when imported
TRAP_MODULE = "nativert_test_trap"  # proves an import happened

OUTPUTS_SOURCE = f"""
import dataclasses
import pathlib

import torch
import torch.utils._pytree as pytree

pathlib.Path(__file__).with_name("{OUTPUTS_MODULE}.imported").write_text("")


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor
    extra: torch.Tensor | None = None


pytree.register_dataclass(Out, serialized_type_name="{OUTPUTS_MODULE}.Out")


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x):
        h = self.fc(x)
        return Out(logits=h.relu(), hidden=h * 2)
"""

SAVE = f"""
import torch, nativert
from {OUTPUTS_MODULE} import Model

torch.manual_seed(0)
model = Model().eval()
x = torch.randn(3, 8)
batch = torch.export.Dim("batch", max=64)
program = torch.export.export(model, (x,), dynamic_shapes=({{0: batch}},))
nativert.save(nativert.to_backend(program), "out.pt2")
with torch.no_grad():
    out = model(x)
torch.save({{"x": x, "logits": out.logits, "hidden": out.hidden}}, "expected.pt")
"""


def _env(folder: Path) -> dict[str, str]:
    """This environment, with `folder` importable (so that an import of the module a file
    names would succeed, and leave its marker)."""
    paths = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter, in `cwd`, which it can import from."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=_env(cwd),
    )


@pytest.fixture(scope="module")
def dataclass_package(tmp_path_factory):
    """A package saved by a process that registered a dataclass output type (in module
    nativert_test_outputs, on this folder only); this process never imports it."""
    folder = tmp_path_factory.mktemp("dataclass_pkg")
    (folder / f"{OUTPUTS_MODULE}.py").write_text(OUTPUTS_SOURCE)
    saved = _python(SAVE, folder)
    assert saved.returncode == 0, saved.stderr[-3000:]
    (folder / f"{OUTPUTS_MODULE}.imported").unlink()  # the saving process imported it
    expected = torch.load(folder / "expected.pt", weights_only=True)
    return folder, folder / "out.pt2", expected


def _not_imported(folder: Path) -> None:
    assert OUTPUTS_MODULE not in sys.modules
    assert not (folder / f"{OUTPUTS_MODULE}.imported").exists(), "the file's module was imported"


def test_unregistered_output_type_is_an_error_naming_the_import(dataclass_package):
    folder, path, _ = dataclass_package
    result = _python(
        f"""
        import nativert
        try:
            nativert.load({str(path)!r})
        except nativert.PackageError as exc:
            print(exc)
        else:
            raise SystemExit("loaded without the type")
        """,
        folder,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout
    assert f"its outputs use the pytree type '{OUTPUTS_MODULE}.Out'" in message
    assert f"add `import {OUTPUTS_MODULE}`" in message
    assert "plain_containers=True" in message
    _not_imported(folder)


def test_plain_containers_give_a_dict_of_the_fields(dataclass_package):
    folder, path, expected = dataclass_package
    program = nativert.load(path, plain_containers=True)
    x = expected["x"]
    want = {"logits": expected["logits"], "hidden": expected["hidden"]}
    with torch.no_grad():
        assert_close(nativert.Executor(program)(x), want, what="executor")
        assert_close(program.module()(x), want, what="module")
    _not_imported(folder)


def test_registered_type_comes_back_when_imported_first(dataclass_package):
    folder, path, _ = dataclass_package
    result = _python(
        f"""
        import torch, nativert
        from {OUTPUTS_MODULE} import Out

        expected = torch.load("expected.pt", weights_only=True)
        program = nativert.load({str(path)!r})
        with torch.no_grad():
            out = nativert.Executor(program)(expected["x"])
        assert type(out) is Out, type(out)
        assert out.extra is None
        assert torch.allclose(out.logits, expected["logits"], atol=1e-5)
        assert torch.allclose(out.hidden, expected["hidden"], atol=1e-5)
        assert type(program.module()(expected["x"])) is Out
        plain = nativert.load({str(path)!r}, plain_containers=True)
        assert type(nativert.Executor(plain)(expected["x"])) is dict  # even when registered
        """,
        folder,
    )
    (folder / f"{OUTPUTS_MODULE}.imported").unlink(missing_ok=True)  # imported on purpose
    assert result.returncode == 0, result.stderr[-3000:]


def test_inspect_and_bench_need_no_output_type(dataclass_package):
    folder, path, _ = dataclass_package
    for args in (["inspect", str(path), "--json"], ["bench", str(path), "--runs", "5"]):
        result = subprocess.run(
            [sys.executable, "-m", "nativert", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=folder,
            env=_env(folder),
        )
        assert result.returncode == 0, (args, result.stderr[-3000:])
        if args[0] == "inspect":
            info = json.loads(result.stdout)
            assert info["output_type"] == f"{OUTPUTS_MODULE}.Out"
            assert [o["name"] for o in info["outputs"]] == ["logits", "hidden"]
            assert info["outputs"][0]["shape"] == ["batch", 6]
        else:
            assert "latency" in result.stdout
    _not_imported(folder)


# -- specs that would make torch import a module ------------------------------------------
@pytest.fixture(scope="module")
def linear_package(tmp_path_factory):
    """Linear(4, 3) lowered to ORT: a single-tensor output whose spec the tests rewrite."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    path = tmp_path_factory.mktemp("linear") / "linear.pt2"
    nativert.save(nativert.to_backend(torch.export.export(model, (x,))), path)
    with torch.no_grad():
        return path, x, model(x)


@pytest.fixture
def trap(tmp_path, monkeypatch):
    """A module on sys.path that leaves a marker file when it is imported."""
    marker = tmp_path / "imported"
    (tmp_path / f"{TRAP_MODULE}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('')\n"
        "class Color:\n    RED = 1\n\ndef factory():\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop(TRAP_MODULE, None)  # were it imported (a failing test), forget it


_LEAF = {"type": None, "context": None, "children_spec": []}


def _with_out_spec(src: Path, dst: Path, spec: dict) -> None:
    def edit(program):
        (entry,) = program["graph_module"]["module_call_graph"]
        entry["signature"]["out_spec"] = json.dumps([1, spec])

    edit_json(src, dst, "models/model.json", edit)


def _defaultdict(module: str, name: str) -> dict:
    context = {
        "default_factory_module": module,
        "default_factory_name": name,
        "dict_context": ["y"],
    }
    return {"type": "collections.defaultdict", "context": context, "children_spec": [_LEAF]}


def _enum_dict(fqn: str) -> dict:
    key = {"__enum__": True, "fqn": fqn, "name": "RED"}
    return {"type": "builtins.dict", "context": json.dumps([key]), "children_spec": [_LEAF]}


def test_torch_itself_would_import_the_module_a_spec_names(trap):
    """Why the checks exist: torch's reader imports a defaultdict's factory module."""
    spec = json.dumps([1, _defaultdict(TRAP_MODULE, "factory")])
    code = f"import torch.utils._pytree as p; p.treespec_loads({spec!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=_env(trap.parent),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert trap.exists()
    trap.unlink()


@pytest.mark.parametrize("plain", [False, True])
def test_unregistered_type_named_after_a_module_imports_nothing(
    linear_package, tmp_path, trap, plain
):
    path, x, expected = linear_package
    hostile = tmp_path / "hostile.pt2"
    spec = {"type": f"{TRAP_MODULE}.Out", "context": '["y"]', "children_spec": [_LEAF]}
    _with_out_spec(path, hostile, spec)
    if plain:
        with torch.no_grad():
            assert_close(nativert.load(hostile, plain_containers=True).module()(x), {"y": expected})
    else:
        with pytest.raises(nativert.PackageError, match=f"add `import {TRAP_MODULE}`"):
            nativert.load(hostile)
    assert not trap.exists()


def test_defaultdict_factory_from_a_module_is_refused(linear_package, tmp_path, trap):
    path, x, expected = linear_package
    hostile = tmp_path / "hostile.pt2"
    _with_out_spec(path, hostile, _defaultdict(TRAP_MODULE, "factory"))
    with pytest.raises(nativert.PackageError, match="has the factory 'nativert_test_trap.factory'"):
        nativert.load(hostile)
    assert not trap.exists()
    with torch.no_grad():  # plain: a dict, and still nothing imported
        assert_close(nativert.load(hostile, plain_containers=True).module()(x), {"y": expected})
    assert not trap.exists()


def test_defaultdict_with_a_builtin_factory_loads(linear_package, tmp_path):
    path, x, expected = linear_package
    saved = tmp_path / "defaultdict.pt2"
    _with_out_spec(path, saved, _defaultdict("builtins", "list"))
    with torch.no_grad():
        out = nativert.load(saved).module()(x)
    assert type(out).__name__ == "defaultdict" and out.default_factory is list
    assert_close(dict(out), {"y": expected})


@pytest.mark.parametrize("plain", [False, True])
def test_enum_from_a_module_not_imported_is_refused(linear_package, tmp_path, trap, plain):
    path, _, _ = linear_package
    hostile = tmp_path / "hostile.pt2"
    _with_out_spec(path, hostile, _enum_dict(f"{TRAP_MODULE}:Color"))
    with pytest.raises(nativert.PackageError, match="names the Enum 'nativert_test_trap:Color'"):
        nativert.load(hostile, plain_containers=plain)
    assert not trap.exists()


class Color(Enum):
    RED = 1


def test_enum_from_an_imported_module_loads(linear_package, tmp_path, monkeypatch):
    path, x, expected = linear_package
    module = types.ModuleType("nativert_test_colors")
    module.Color = Color
    monkeypatch.setitem(sys.modules, module.__name__, module)
    saved = tmp_path / "enum.pt2"
    _with_out_spec(path, saved, _enum_dict("nativert_test_colors:Color"))
    with torch.no_grad():
        out = nativert.load(saved).module()(x)
    assert list(out) == [Color.RED]
    assert_close(out[Color.RED], expected)


# -- the spec logic on its own ------------------------------------------------------------
def _loads(serialized: str) -> dict:
    return json.loads(serialized)[1]


def test_plain_dataclass_keeps_present_fields_and_drops_none_ones():
    spec = {
        "type": "some.Out",
        "context": json.dumps([["a", "b"], ["c"]]),
        "children_spec": [_LEAF, _LEAF],
    }
    plain = _loads(check_treespec(json.dumps([1, spec]), plain_containers=True))
    assert plain["type"] == "builtins.dict" and json.loads(plain["context"]) == ["a", "b"]


def test_plain_opaque_context_and_namedtuple_become_tuples():
    opaque = {"type": "some.Thing", "context": '{"x": 1}', "children_spec": [_LEAF]}
    named = {"type": "collections.namedtuple", "context": "some.NT", "children_spec": [_LEAF]}
    for spec in (opaque, named):
        plain = _loads(check_treespec(json.dumps([1, spec]), plain_containers=True))
        assert plain == {"type": "builtins.tuple", "context": "null", "children_spec": [_LEAF]}


def test_unregistered_namedtuple_names_its_type():
    named = {"type": "collections.namedtuple", "context": "some.mod.NT", "children_spec": []}
    with pytest.raises(Refused, match="pytree type 'some.mod.NT'.*`import some.mod`"):
        check_treespec(json.dumps([1, named]), plain_containers=False)


@pytest.mark.parametrize(
    "spec",
    [
        "not json",
        json.dumps([2, _LEAF]),
        json.dumps([1, {"type": None, "context": "x", "children_spec": []}]),
        json.dumps([1, {"type": "builtins.dict", "context": "[]", "children_spec": [_LEAF]}]),
        json.dumps([1, {"type": "builtins.tuple", "context": "null"}]),
    ],
)
def test_malformed_specs_are_refused(spec):
    with pytest.raises(Refused):
        check_treespec(spec, plain_containers=False)


def test_deep_specs_are_refused_not_a_crash():
    spec = _LEAF
    for _ in range(300):
        spec = {"type": "builtins.tuple", "context": "null", "children_spec": [spec]}
    with pytest.raises(Refused, match="nests deeper"):
        check_treespec(json.dumps([1, spec]), plain_containers=True)


def test_leaf_paths_follow_the_saved_types():
    out = {
        "type": "some.Out",
        "context": json.dumps(["last_hidden_state", "pooler_output"]),
        "children_spec": [_LEAF, _LEAF],
    }
    logits = {"type": "builtins.dict", "context": '["logits"]', "children_spec": [_LEAF]}
    nested = {"type": "builtins.tuple", "context": "null", "children_spec": [out, logits]}
    assert leaf_paths(json.dumps([1, nested])) == [
        "[0].last_hidden_state",
        "[0].pooler_output",
        "[1]['logits']",
    ]
    assert leaf_paths(json.dumps([1, out])) == ["last_hidden_state", "pooler_output"]
    assert leaf_paths(json.dumps([1, _LEAF])) == ["output"]
    assert leaf_paths("not json") is None


# -- a real transformers model ------------------------------------------------------------
BERT_SAVE = """
import torch, nativert
from transformers import BertConfig, BertModel

config = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=64,
)
torch.manual_seed(0)
model = BertModel(config).eval()
ids = torch.randint(0, 100, (2, 8))
nativert.save(nativert.to_backend(torch.export.export(model, (ids,))), "bert.pt2")
with torch.no_grad():
    out = model(ids)
torch.save({"ids": ids, "last_hidden_state": out.last_hidden_state,
            "pooler_output": out.pooler_output}, "bert_expected.pt")
"""

BERT_LOAD = """
import sys, torch, nativert
{first}
expected = torch.load("bert_expected.pt", weights_only=True)
try:
    program = nativert.load("bert.pt2")
except nativert.PackageError as exc:
    print("PackageError:", exc)
    program = nativert.load("bert.pt2", plain_containers=True)
with torch.no_grad():
    out = nativert.Executor(program)(expected["ids"])
print("type:", type(out).__module__, type(out).__name__)
for key in ("last_hidden_state", "pooler_output"):
    assert torch.allclose(out[key], expected[key], atol=1e-4), key
print("transformers imported:", "transformers" in sys.modules)
"""


@pytest.mark.slow
def test_transformers_model_loads_in_a_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    saved = _python(BERT_SAVE, tmp_path)
    assert saved.returncode == 0, saved.stderr[-3000:]

    bare = _python(BERT_LOAD.format(first=""), tmp_path)
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert "add `import transformers.modeling_outputs`" in bare.stdout
    assert "type: builtins dict" in bare.stdout
    assert "transformers imported: False" in bare.stdout

    registered = _python(BERT_LOAD.format(first="import transformers.modeling_outputs"), tmp_path)
    assert registered.returncode == 0, registered.stderr[-3000:]
    assert "PackageError" not in registered.stdout
    assert (
        "type: transformers.modeling_outputs BaseModelOutputWithPoolingAndCrossAttentions"
        in registered.stdout
    )

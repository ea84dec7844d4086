"""The untrusted-program check reads torch's schema field by field: names a user chose (an
input called `target`, a weight called `expr_str`) are data, never fields; what torch would
evaluate (node targets, expressions, `guards_code`) is checked or dropped; and a file broken
anywhere, headers included, is a PackageError naming it."""

from __future__ import annotations

import dataclasses
import keyword
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch._export.serde import schema

import nativert
from nativert import cli
from nativert.serve.model import PackageModel
from tests.backend.package.crafting import MANIFEST, edit_json, read_members, rewrite
from tests.conftest import assert_close
from tests.models import make

MODEL_JSON = "models/model.json"


def _schema_keys() -> list[str]:
    """Every key torch's serialized program can hold (each field of each schema dataclass),
    plus the names of an FX node's fields."""
    keys = {"op", "args", "kwargs", "meta", "target", "name", "users"}
    for value in vars(schema).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value):
            keys.update(f.name for f in dataclasses.fields(value))
    return sorted(k for k in keys if k.isidentifier() and not keyword.iskeyword(k))


def _colliding_model(names: list[str]) -> torch.nn.Module:
    """forward(self, <every name>) returning sum(name * weight named name): each name is an
    input and a weight (parameter, or buffer every third), wherever nn.Module allows it."""
    source = (
        f"def forward(self, {', '.join(names)}):\n"
        f"    inputs = [{', '.join(names)}]\n"
        "    return sum(x * self.get_parameter_or_buffer(n) for n, x in zip(self.order, inputs))\n"
    )
    namespace: dict = {}
    exec(source, namespace)  # a signature made of the colliding names
    # torch's own .module() sets weights on its graph module: names that module has (meta,
    # graph, range_constraints, ...) cannot be weights there, whatever nativert does.
    unlifted = torch.export.export(torch.nn.Linear(1, 1), (torch.randn(1, 1),)).module()
    reserved = set(dir(unlifted)) | set(vars(unlifted))

    class Colliding(torch.nn.Module):
        forward = namespace["forward"]

        def __init__(self) -> None:
            super().__init__()
            self.order = names
            self.stored = {}
            for i, name in enumerate(names):
                value = torch.randn(3)
                if hasattr(self, name) or name in reserved:
                    self.stored[name] = f"w_{name}"  # a module's own attribute: renamed
                    self.register_buffer(f"w_{name}", value)
                elif i % 3 == 0:
                    self.register_buffer(name, value)
                else:
                    self.register_parameter(name, torch.nn.Parameter(value))

        def get_parameter_or_buffer(self, name):
            return getattr(self, self.stored.get(name, name))

    return Colliding().eval()


def test_names_that_are_schema_keys_save_load_in_a_fresh_process_and_run(tmp_path):
    names = _schema_keys()
    assert {"target", "name", "op", "args", "kwargs", "meta", "as_tensor", "expr_str"} <= set(names)
    torch.manual_seed(0)
    model = _colliding_model(names)
    inputs = tuple(torch.randn(3) for _ in names)
    program = torch.export.export(model, inputs)
    placeholders = {n.name for n in program.graph.nodes if n.op == "placeholder"}
    assert {"target", "expr_str", "as_operator"} <= placeholders  # the names torch wrote
    path = tmp_path / "colliding.pt2"
    nativert.save(nativert.to_backend(program), path)
    torch.save(inputs, tmp_path / "inputs.pt")
    code = (
        "import torch, nativert\n"
        f"program = nativert.load({str(path)!r})\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    out = (nativert.Executor(program)(*inputs), program.module()(*inputs))\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    executor_out, module_out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        expected = model(*inputs)
    assert_close(executor_out, expected, what="Executor")
    assert_close(module_out, expected, what=".module()")


class _Loss(torch.nn.Module):
    def forward(self, input, target):
        return ((input - target) ** 2).mean()


def test_inspect_and_the_serving_api_name_inputs_alike(tmp_path, capsys):
    """`input` is the placeholder `input_1` in the graph; a user (and the HTTP API) says
    `input`."""
    program = torch.export.export(_Loss(), (torch.randn(3), torch.randn(3)))
    lowered = nativert.to_backend(program)
    assert list(lowered.graph_signature.user_inputs) == ["input_1", "target"]
    path = tmp_path / "loss.pt2"
    nativert.save(lowered, path)
    assert cli.main(["inspect", str(path)]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "input input: float32 [3]" in lines and "input target: float32 [3]" in lines, lines
    assert PackageModel(nativert.load(path)).input_names == ["input", "target"]


# -- what torch would evaluate -------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A program whose export recorded guards (`L['x'].size()[0] % 2 == 0`)."""

    class Halves(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1, 2) * 2

    x = torch.randn(8)
    program = torch.export.export(Halves(), (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    assert program._guards_code, "torch no longer records guards here: pick another model"
    path = tmp_path_factory.mktemp("guarded") / "model.pt2"
    nativert.save(nativert.to_backend(program), path)
    return x, path


def test_guards_code_from_the_file_never_runs(guarded, tmp_path):
    """torch `exec`s a program's guards_code when `.module()` runs on a program with example
    inputs; a file's is Python source an attacker writes, so loading drops it."""
    x, path = guarded
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt2"
    injected = f"__import__('os').system('touch {marker}') == 0 or True"
    edit_json(path, hostile, MODEL_JSON, lambda p: p.update(guards_code=[injected]))
    loaded = nativert.load(hostile)
    assert loaded._guards_code == []
    loaded.example_inputs = ((x,), {})  # what would make torch build the guards
    with torch.no_grad():
        assert_close(loaded.module()(x), x.reshape(-1, 2) * 2)
        assert_close(nativert.Executor(loaded)(x), x.reshape(-1, 2) * 2)
    assert not marker.exists(), "guards_code from the file ran"


@pytest.mark.parametrize(
    "expression",
    [
        "Lambda(Symbol('s0', integer=True), Integer(1))",
        "exec(Integer(1))",
        "Function('f')",
        "Subs(Symbol('s0'), Symbol('s0'), Integer(3))",
        "Symbol('s0', integer=True, positive=True, evaluate=True)",
        # Well-formed and allowlisted, but sympy would compute them while loading:
        "Pow(Integer(2), Integer(99999999999))",
        "LShift(Integer(1), Mul(Integer(100000), Integer(100000)))",
        "Mul(Integer(123456789012345678901234567890), Symbol('s0', integer=True))",
    ],
)
def test_a_well_formed_call_of_a_function_off_the_allowlist_is_refused(
    guarded, tmp_path, expression
):
    """Tokens the tokenizer accepts and a well-formed call: only the allowlist refuses it."""
    _, path = guarded
    hostile = tmp_path / "hostile.pt2"

    def inject(program):
        sizes = program["graph_module"]["graph"]["tensor_values"]
        expr = next(
            s["as_expr"] for meta in sizes.values() for s in meta["sizes"] if "as_expr" in s
        )
        expr["expr_str"] = expression

    edit_json(path, hostile, MODEL_JSON, inject)
    with pytest.raises(nativert.PackageError, match=r"hostile.pt2: models/model.json: symbolic"):
        nativert.load(hostile)


# -- corruption and tampering --------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, (x,) = make("mlp")
    path = tmp_path_factory.mktemp("mlp") / "model.pt2"
    nativert.save(nativert.to_backend(torch.export.export(model, (x,))), path)
    with torch.no_grad():
        expected = nativert.Executor(nativert.load(path))(x)
    return x, path, expected


def _header_offsets(path: Path, member_suffix: str) -> list[int]:
    """The bytes of one member's local header (with its name) and of its central directory
    entry."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith(member_suffix)]
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
        local = range(info.header_offset, info.header_offset + 30 + name_len + extra_len)
        central = raw.index(b"PK\x01\x02" + raw[info.header_offset + 4 : info.header_offset + 6])
        while raw[central + 46 : central + 46 + len(info.orig_filename)] != (
            info.orig_filename.encode()
        ):
            central = raw.index(b"PK\x01\x02", central + 1)
    return [*local, *range(central, central + 46 + len(info.orig_filename))]


@pytest.mark.parametrize("member", ["data/weights/weight_0", "nativert/0.bin"])
def test_a_flip_in_a_zip_header_is_a_package_error_naming_the_file(saved, tmp_path, member):
    """Headers hold names, sizes, flags and the compression method: zipfile answers flips
    there with UnicodeDecodeError, RuntimeError ('is encrypted'), NotImplementedError, ...
    Every one must be our error, and a file that still loads must answer right."""
    x, path, expected = saved
    raw = path.read_bytes()
    hostile = tmp_path / "flipped.pt2"
    refused = 0
    for i, offset in enumerate(_header_offsets(path, member)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x80 if i % 2 else 0x01  # a high bit and a low bit, in turn
        hostile.write_bytes(bytes(flipped))
        try:
            loaded = nativert.load(hostile)
        except nativert.PackageError as exc:
            assert "flipped.pt2" in str(exc), exc
            refused += 1
            continue
        with torch.no_grad():
            assert torch.equal(nativert.Executor(loaded)(x), expected), offset
    assert refused > 0


@pytest.mark.parametrize(
    "member",
    [
        MODEL_JSON,
        "models/nativert_segment_0.json",
        "data/executorch/nativert/0.bin",
        "data/weights/model_weights_config.json",
        "archive_version",
    ],
)
def test_a_changed_non_weight_member_fails_its_digest(saved, tmp_path, member):
    """Same size, fresh CRCs, the manifest as saved: only the SHA-256 can tell."""
    _, path, _ = saved
    _, members = read_members(path)
    data = bytearray(members[member])
    position = len(data) // 2
    data[position] = ord("7") if data[position] != ord("7") else ord("8")
    hostile = tmp_path / "changed.pt2"
    rewrite(path, hostile, {member: bytes(data)}, refresh=False)
    with zipfile.ZipFile(hostile) as archive:
        assert archive.testzip() is None  # every CRC is right
    with pytest.raises(nativert.PackageError, match=rf"member {member} fails its SHA-256 check"):
        nativert.load(hostile)


def test_an_unknown_compile_spec_in_a_manifest_names_the_file_and_segment(saved, tmp_path):
    _, path, _ = saved
    hostile = tmp_path / "specs.pt2"
    edit_json(
        path, hostile, MANIFEST, lambda m: m["delegates"][0]["compile_specs"].append(["evil", 1])
    )
    with pytest.raises(
        nativert.PackageError,
        match=r"specs.pt2: the compile specs of segment 'onnxruntime_0' \(onnxruntime\) are "
        r"refused: .*no compile specs \['evil'\]",
    ):
        nativert.load(hostile)


def test_a_compile_spec_value_that_would_hurt_is_refused(saved, tmp_path):
    _, path, _ = saved
    hostile = tmp_path / "threads.pt2"

    def many_threads(manifest):
        manifest["delegates"][0]["compile_specs"].append(["intra_op_num_threads", 10**9])

    edit_json(path, hostile, MANIFEST, many_threads)
    with pytest.raises(nativert.PackageError, match=r"'intra_op_num_threads' must be an int"):
        nativert.load(hostile)

"""Packages from somewhere else: crafted files run no code they choose, corrupted files never
give a wrong answer, and every refusal names the file and the member."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch.export import Dim

import nativert
from nativert import cli
from tests.backend.package.crafting import (
    MANIFEST,
    edit_json,
    member_name,
    read_members,
    rewrite,
    trap_bytes,
    write_members,
)
from tests.conftest import assert_close
from tests.models import make

MODEL_JSON = "models/model.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The MLP with a dynamic batch (so its program holds symbolic sizes), lowered to ORT."""
    model, (x,) = make("mlp")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", max=64)},))
    path = tmp_path_factory.mktemp("pkg") / "model.pt2"
    nativert.save(nativert.to_backend(program), path)
    with torch.no_grad():
        expected = model(x)
    return model, x, path, expected


def _first(data, match):
    """The first dict in a JSON tree for which match(d) holds."""
    stack = [data]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            if match(item):
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError("nothing matched")


# -- code from the file -------------------------------------------------------------------
def _injection(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}') or 3"


@pytest.mark.parametrize("where", ["expr_str", "as_int_size", "segment_program"])
def test_expression_injection_is_refused_and_runs_nothing(saved, tmp_path, where):
    _, _, path, _ = saved
    marker = tmp_path / "pwned"
    member = "models/nativert_segment_0.json" if where == "segment_program" else MODEL_JSON

    def inject(program):
        if where == "as_int_size":
            size = _first(program, lambda d: "as_int" in d and isinstance(d["as_int"], int))
            size.pop("as_int")
            size["as_expr"] = {"expr_str": _injection(marker), "hint": None}
        else:
            _first(program, lambda d: "expr_str" in d)["expr_str"] = _injection(marker)

    hostile = tmp_path / "hostile.pt2"
    edit_json(path, hostile, member, inject)
    with pytest.raises(nativert.PackageError, match=rf"hostile.pt2: {member}: symbolic expr"):
        nativert.load(hostile)
    assert cli.main(["inspect", str(hostile)]) == 1
    assert not marker.exists(), "code from the file ran"


@pytest.mark.parametrize(
    "target",
    ["torch.ops.import_module", "torch.hub.load", "builtins.eval", "torch.ops.aten.nope.default"],
)
def test_node_targets_that_are_not_operators_are_refused(saved, tmp_path, target):
    _, _, path, _ = saved
    hostile = tmp_path / "hostile.pt2"
    edit_json(
        path,
        hostile,
        MODEL_JSON,
        lambda p: _first(p, lambda d: "target" in d).update(target=target),
    )
    with pytest.raises(nativert.PackageError, match=rf"node target '{target}' is not"):
        nativert.load(hostile)


class _Inverse(torch.nn.Module):
    """linalg.inv: its error check is saved as with_effects(token, <operator>, ...)."""

    def forward(self, a):
        return torch.linalg.inv(torch.relu(a) + torch.eye(3))


@pytest.mark.parametrize(
    "operator", ["torch.os.system", "builtins.eval", "torch.ops.aten.nope.default"]
)
def test_operator_arguments_that_are_not_operators_are_refused(tmp_path, operator):
    """The op with_effects runs is resolved by name like a node target (`torch.os.system`
    is os.system): it gets the same check."""
    program = nativert.to_backend(torch.export.export(_Inverse(), (torch.randn(3, 3),)))
    path, hostile = tmp_path / "inverse.pt2", tmp_path / "hostile.pt2"
    nativert.save(program, path)
    nativert.load(path)  # the file as saved loads
    edit_json(
        path,
        hostile,
        MODEL_JSON,
        lambda p: _first(p, lambda d: "as_operator" in d).update(as_operator=operator),
    )
    with pytest.raises(nativert.PackageError, match=rf"operator argument '{operator}' is not"):
        nativert.load(hostile)


def test_sample_inputs_are_never_unpickled(saved, tmp_path):
    model, x, path, expected = saved
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt2"
    rewrite(path, hostile, {"data/sample_inputs/model.pt": trap_bytes(marker)})
    with torch.no_grad():
        assert_close(nativert.load(hostile).module()(x), expected)
    assert not marker.exists()


def test_pickled_weights_are_refused(saved, tmp_path):
    _, _, path, _ = saved
    marker = tmp_path / "pwned"
    _, members = read_members(path)
    config_name = "data/weights/model_weights_config.json"
    config = json.loads(members[config_name])
    fqn, entry = next(iter(config["config"].items()))
    entry["use_pickle"] = True
    hostile = tmp_path / "hostile.pt2"
    rewrite(
        path,
        hostile,
        {
            config_name: json.dumps(config).encode(),
            f"data/weights/{entry['path_name']}": trap_bytes(marker),
        },
    )
    with pytest.raises(nativert.PackageError, match=rf"weight '{fqn}' .* stored as a pickle"):
        nativert.load(hostile)
    assert not marker.exists()


# -- native code --------------------------------------------------------------------------
_CONSTRUCTOR = r"""
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) fclose(f);
}
"""


def _library(tmp_path: Path, marker: Path) -> bytes:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build a shared library")
    source = tmp_path / "lib.c"
    source.write_text(_CONSTRUCTOR)
    library = tmp_path / "lib.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(library)],
        check=True,
        capture_output=True,
    )
    return library.read_bytes()


def test_native_payload_is_refused_without_trust(saved, tmp_path):
    """A manifest that says aoti, with a library whose constructor writes a file."""
    _, _, path, _ = saved
    marker = tmp_path / "constructor_ran"
    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as archive:
        archive.writestr("model/data/aotinductor/model/model.so", _library(tmp_path, marker))
    root, members = read_members(path)
    manifest = json.loads(members[MANIFEST])
    manifest["delegates"][0]["backend_id"] = "aoti"
    members[MANIFEST] = json.dumps(manifest).encode()
    members["data/executorch/nativert/0.bin"] = payload.getvalue()
    hostile = tmp_path / "native.pt2"
    write_members(hostile, root, members, refresh=True)

    with pytest.raises(
        nativert.PackageError,
        match=r"native.pt2: segment 'onnxruntime_0' is a 'aoti' payload, which is native code.*"
        r"trust_native_code=True\) \(CLI: --trust-native-code\)",
    ):
        nativert.load(hostile)
    assert cli.main(["inspect", str(hostile)]) == 1
    assert not marker.exists(), "the library was loaded without trust"

    # With trust the file loads, and its library runs when a runner loads the segment.
    if not nativert.get_delegate("aoti").is_available():
        return
    loaded = nativert.load(hostile, trust_native_code=True)
    with pytest.raises(nativert.NativertError):
        nativert.Executor(loaded)  # not a real AOTInductor model
    assert marker.exists(), "the trusted library did not run"


def test_onnx_payload_that_reads_files_is_refused(saved, tmp_path):
    import onnx

    _, _, path, _ = saved
    _, members = read_members(path)
    model = onnx.load_from_string(members["data/executorch/nativert/0.bin"])
    initializer = model.graph.initializer[0]
    for entry in initializer.external_data:
        if entry.key == "location":
            entry.value = "/etc/hostname"
    hostile = tmp_path / "reads_files.pt2"
    rewrite(path, hostile, {"data/executorch/nativert/0.bin": model.SerializeToString()})
    with pytest.raises(
        nativert.PackageError,
        match=r"segment 'onnxruntime_0' \(onnxruntime\) is refused: .*"
        r"reads external data from \['/etc/hostname'\]",
    ):
        nativert.load(hostile)


# -- corruption ---------------------------------------------------------------------------
def _data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Member -> (first byte, end) of its data inside the zip file."""
    ranges = {}
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 :][:4])
            start = info.header_offset + 30 + name_len + extra_len
            ranges[info.filename.split("/", 1)[1]] = (start, start + info.compress_size)
    return ranges


def _outcome(path: Path, x: torch.Tensor):
    """ "refused", or the output the loaded program computes."""
    try:
        loaded = nativert.load(path)
        with torch.no_grad():
            return nativert.Executor(loaded)(x)
    except nativert.NativertError:
        return "refused"


def test_flipped_bytes_anywhere_never_give_a_wrong_answer(saved, tmp_path):
    _, x, path, _ = saved
    expected = _outcome(path, x)  # what the intact file computes
    raw = path.read_bytes()
    ranges = _data_ranges(path)
    must_refuse = {}
    for member in (
        "data/weights/weight_0",
        "data/executorch/nativert/0.bin",
        MODEL_JSON,
        "data/weights/model_weights_config.json",
        MANIFEST,
    ):
        start, end = ranges[member]
        for k in range(4):  # spread over the member
            must_refuse[start + (end - start - 1) * k // 3] = member
    anywhere = torch.Generator().manual_seed(0)
    offsets = list(must_refuse) + torch.randint(0, len(raw), (24,), generator=anywhere).tolist()
    refused = 0
    for offset in offsets:
        flipped = bytearray(raw)
        flipped[offset] ^= 0x5A
        hostile = tmp_path / "flipped.pt2"
        hostile.write_bytes(bytes(flipped))
        outcome = _outcome(hostile, x)
        if isinstance(outcome, str):
            refused += 1
            continue
        assert offset not in must_refuse, f"a flip in {must_refuse[offset]} was not caught"
        assert torch.equal(outcome, expected), f"flip at byte {offset} changed the answer"
    assert refused >= len(must_refuse), (refused, len(offsets))


def test_tampering_rezipped_with_fresh_crcs_fails_the_digest(saved, tmp_path):
    _, _, path, _ = saved
    _, members = read_members(path)
    weight = bytearray(members["data/weights/weight_0"])
    weight[5] ^= 0x01
    hostile = tmp_path / "rezipped.pt2"
    rewrite(path, hostile, {"data/weights/weight_0": bytes(weight)}, refresh=False)
    with zipfile.ZipFile(hostile) as archive:
        assert archive.testzip() is None  # every CRC is right
    with pytest.raises(
        nativert.PackageError, match=r"rezipped.pt2: member data/weights/weight_0 fails its SHA-256"
    ):
        nativert.load(hostile)


def test_a_member_the_manifest_does_not_list_is_refused(saved, tmp_path):
    _, _, path, _ = saved
    root, members = read_members(path)
    hostile = tmp_path / "smuggled.pt2"
    write_members(hostile, root, members, refresh=True)
    with zipfile.ZipFile(hostile, "a") as archive:
        archive.writestr(f"{root}/data/weights/extra.pt", b"anything")
    with pytest.raises(nativert.PackageError, match=r"not listed: \['data/weights/extra.pt'\]"):
        nativert.load(hostile)


def test_a_zip_bomb_is_refused_before_it_is_decompressed(saved, tmp_path):
    """A weight member of 256 MiB of zeros (a few hundred KB compressed) behind a small
    tensor, with digests an attacker recomputed: refused on its declared size."""
    _, _, path, _ = saved
    root, members = read_members(path)
    bomb_size = 256 << 20
    sha, chunk = hashlib.sha256(), bytes(1 << 20)
    for _ in range(bomb_size // len(chunk)):
        sha.update(chunk)
    manifest = json.loads(members[MANIFEST])
    manifest["members"] = {
        n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in members.items()
        if n != MANIFEST
    }
    manifest["members"]["data/weights/weight_0"] = {"size": bomb_size, "sha256": sha.hexdigest()}
    members[MANIFEST] = json.dumps(manifest).encode()
    hostile = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(hostile, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            if name != "data/weights/weight_0":
                archive.writestr(f"{root}/{name}", data)
                continue
            with archive.open(f"{root}/{name}", "w", force_zip64=True) as member:
                for _ in range(bomb_size // len(chunk)):
                    member.write(chunk)
    assert hostile.stat().st_size < 4 << 20
    with pytest.raises(
        nativert.PackageError,
        match=r"bomb.pt2: member data/weights/weight_0 declares 268435456 bytes but its tensors "
        r"need \d+; refusing to decompress it",
    ):
        nativert.load(hostile)


def test_truncated_garbage_missing_and_foreign_files(saved, tmp_path):
    _, _, path, _ = saved
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


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (99, "package format 99; this nativert reads format 2"),
        (1, "package format 1; this nativert reads format 2 \\(re-save the program"),
    ],
)
def test_other_format_versions_are_refused(saved, tmp_path, version, message):
    _, _, path, _ = saved
    other = tmp_path / "other.pt2"
    edit_json(path, other, MANIFEST, lambda m: m.update(format_version=version))
    with pytest.raises(nativert.PackageError, match=message):
        nativert.load(other)


def test_a_garbage_payload_is_refused_at_load(saved, tmp_path):
    _, _, path, _ = saved
    payload = member_name(path, "nativert/0.bin")
    hostile = tmp_path / "bad.pt2"
    rewrite(path, hostile, {payload: b"garbage"})
    with pytest.raises(nativert.PackageError, match=r"onnxruntime_0.*refused: not an ONNX model"):
        nativert.load(hostile)

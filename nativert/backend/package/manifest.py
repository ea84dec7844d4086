"""The nativert manifest of a package, and the segment-program builder save and load share.

`extra/nativert/manifest.json` is a versioned JSON header: the size and SHA-256 of every
other member of the archive, and per delegate its backend id, delegate and toolchain
versions, compile specs, weight inputs, input/output names, mutated and non-differentiable
indices, plus the partition reasons for the delegation report and the user's names for the
dynamic dims (torch keeps them in the export's shape environment, which is not saved). A
loader checks its shape before reading anything it names (`check_manifest`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.export.pt2_archive.constants import EXTRA_DIR

from nativert._program import program_from_graph
from nativert._program.accuracy import Accuracy
from nativert.backend.package.archive import Archive
from nativert.errors import PackageError

FORMAT_VERSION = 2  # 2: member digests; format 1 files cannot be checked and are refused
MANIFEST = "nativert/manifest.json"
MANIFEST_MEMBER = f"{EXTRA_DIR}{MANIFEST}"
TOP = "model"
_MANIFEST_LIMIT = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9_]+\Z")
_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}\Z")
# graph_module.meta key of a loaded program: {symbol: Dim name}, so that saving it again
# keeps the names.
DIM_NAMES_META = "nativert_dim_names"


def dim_names(program: ExportedProgram) -> dict[str, str]:
    """{symbol: the name the user gave its Dim} for the program's dynamic dims, e.g.
    {"s77": "batch"}; unnamed dims (Dim.AUTO, ...) are left out.

    torch names the symbols itself; the user's names live only in the export's shape
    environment (`source_name_to_debug_name`, by input source), which torch does not
    save: a loaded program has them from the manifest instead (`DIM_NAMES_META`)."""
    names = {
        k: v
        for k, v in program.graph_module.meta.get(DIM_NAMES_META, {}).items()
        if isinstance(k, str) and isinstance(v, str)
    }
    env = next(
        (
            d.node.shape_env
            for n in program.graph.nodes
            if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
            for d in n.meta["val"].shape
            if isinstance(d, torch.SymInt)
        ),
        None,
    )
    # ShapeEnv is private torch API; the names are cosmetic, so a torch without these
    # attributes gives unnamed dims, not a failed save (test_dim_names pins them).
    debug = getattr(env, "source_name_to_debug_name", None) or {}
    sources = getattr(env, "var_to_sources", None) or {}
    for symbol in program.range_constraints:
        for source in sources.get(symbol, ()):
            name = debug.get(source.name)
            if isinstance(name, str) and _DIM_NAME.match(name):
                names[str(symbol)] = name
                break
    symbols = {str(s) for s in program.range_constraints}
    return {k: v for k, v in names.items() if k in symbols and _DIM_NAME.match(v)}


def program_with_inputs(
    segment: ExportedProgram,
    weights: list[dict],
    state: dict[str, Any],
    *,
    take_graph: bool = False,
) -> ExportedProgram:
    """The segment with its first len(weights) placeholders as weights (from `state`, by
    each weight's program source) and the rest user inputs; `weights=[]` gives the
    weight-free form that is saved. With `take_graph`, the new program takes the segment's
    graph module instead of a copy (the caller drops `segment`: loading does, and the deep
    copy of a large graph's metadata was a fifth of the load)."""
    specs = [
        InputSpec(InputKind[w["kind"]], TensorArgument(name=""), w["target"], w.get("persistent"))
        for w in weights
    ]
    tensors = {w["target"]: state[w.get("source", w["target"])] for w in weights}
    return program_from_graph(
        segment.graph_module if take_graph else copy.deepcopy(segment.graph_module),
        specs,
        tensors,
        range_constraints=segment.range_constraints,
        verifiers=segment.verifiers,
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The nativert manifest of a package (delegates, versions, specs), checked, without
    loading the programs."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackageError(f"{path}: no such file")
    with Archive(path) as archive:
        return manifest_of(archive)


def manifest_of(archive: Archive) -> dict[str, Any]:
    """Read and check the manifest (it vouches for every other member, so it is the one
    member read without a digest)."""
    path = archive.path
    if MANIFEST_MEMBER not in archive.names():
        raise PackageError(
            f"{path} has no nativert manifest: it was not written by nativert.save "
            "(plain programs load with torch.export.load)"
        )
    try:
        manifest = json.loads(archive.read(MANIFEST_MEMBER, limit=_MANIFEST_LIMIT))
    except ValueError as exc:
        raise PackageError(f"{path}: the nativert manifest is not valid JSON: {exc}") from exc
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: Any, path: str) -> None:
    """Raise PackageError unless the manifest has the shape `save` writes."""
    if not isinstance(manifest, dict) or manifest.get("format") != "nativert":
        raise PackageError(f"{path}: the nativert manifest is not a nativert manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = " (re-save the program to add member digests)" if version == 1 else ""
        raise PackageError(
            f"{path}: nativert package format {version!r}; this nativert reads format "
            f"{FORMAT_VERSION}{hint}"
        )

    def bad(what: str) -> PackageError:
        return PackageError(f"{path}: the nativert manifest has a malformed {what}")

    entries = manifest.get("delegates")
    if not isinstance(entries, list):
        raise bad("delegate list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise bad(f"delegate entry {i}")
        for key in ("module_name", "backend_id", "delegate_version"):
            if not isinstance(entry.get(key), str):
                raise bad(f"{key} in delegate entry {i}")
        if not _NAME.match(entry["module_name"]):
            raise bad(f"module_name {entry['module_name']!r}")
        if entry.get("program") != f"nativert_segment_{i}" or entry.get("payload") != (
            f"nativert/{i}.bin"
        ):
            raise bad(f"program or payload name in delegate entry {i}")
        _check_entry_lists(entry, i, bad)
    reasons = manifest.get("reasons", {})
    if not isinstance(reasons, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in reasons.items()
    ):
        raise bad("reasons table")
    names = manifest.get("dim_names", {})  # absent in files saved before it was added
    if not isinstance(names, dict) or not all(
        isinstance(k, str) and _NAME.match(k) and isinstance(v, str) and _DIM_NAME.match(v)
        for k, v in names.items()
    ):
        raise bad("dim_names table")


def _check_entry_lists(entry: dict, i: int, bad) -> None:
    specs = entry.get("compile_specs")
    if not isinstance(specs, list) or not all(
        isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) for s in specs
    ):
        raise bad(f"compile_specs in delegate entry {i}")
    for key in ("inputs", "outputs"):
        if not isinstance(entry.get(key), list):
            raise bad(f"{key} in delegate entry {i}")
    for key in ("mutated_arg_indices", "nondifferentiable_outputs"):
        values = entry.get(key)
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
        ):
            raise bad(f"{key} in delegate entry {i}")
    if entry.get("accuracy") is not None:  # absent before precision settings existed
        try:
            Accuracy.from_json(entry["accuracy"])
        except ValueError:
            raise bad(f"accuracy in delegate entry {i}") from None
    weights = entry.get("weights")
    if not isinstance(weights, list):
        raise bad(f"weights in delegate entry {i}")
    for w in weights:
        if not (
            isinstance(w, dict)
            and w.get("kind") in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")
            and isinstance(w.get("target"), str)
            and isinstance(w.get("source"), str)
            and w.get("persistent") in (True, False, None)
        ):
            raise bad(f"weight {w!r} in delegate entry {i}")

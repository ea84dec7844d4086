"""The nativert manifest of a package: a versioned JSON header, and the program builder that
save and load share.

`extra/nativert/manifest.json` records each delegate's backend id, delegate version,
toolchain versions, compile specs, weight inputs, input/output names, mutated and
non-differentiable indices, and the partition reasons for the delegation report.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from nativert._program import program_from_graph
from nativert.errors import PackageError

FORMAT_VERSION = 1
MANIFEST = "nativert/manifest.json"
TOP = "model"


def program_with_inputs(
    segment: ExportedProgram, weights: list[dict], state: dict[str, Any]
) -> ExportedProgram:
    """The segment with its first len(weights) placeholders as weights (from `state`, by
    each weight's program source) and the rest user inputs; `weights=[]` gives the
    weight-free form that is saved."""
    specs = [
        InputSpec(InputKind[w["kind"]], TensorArgument(name=""), w["target"], w.get("persistent"))
        for w in weights
    ]
    tensors = {w["target"]: state[w.get("source", w["target"])] for w in weights}
    return program_from_graph(
        copy.deepcopy(segment.graph_module),
        specs,
        tensors,
        range_constraints=segment.range_constraints,
        verifiers=segment.verifiers,
    )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The nativert manifest of a package (delegates, versions, specs), without loading it."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackageError(f"{path}: no such file")
    try:
        with PT2ArchiveReader(path) as reader:
            return manifest_of(reader, set(reader.get_file_names()), path)
    except PackageError:
        raise
    except Exception as exc:
        raise PackageError(f"{path}: cannot read its manifest: {exc}") from exc


def manifest_of(reader: Any, files: set[str], path: str) -> dict[str, Any]:
    from torch.export.pt2_archive.constants import EXTRA_DIR

    if f"{EXTRA_DIR}{MANIFEST}" not in files:
        raise PackageError(
            f"{path} has no nativert manifest: it was not written by nativert.save "
            "(plain programs load with torch.export.load)"
        )
    try:
        return json.loads(reader.read_string(f"{EXTRA_DIR}{MANIFEST}"))
    except ValueError as exc:
        raise PackageError(f"{path}: the nativert manifest is not valid JSON: {exc}") from exc



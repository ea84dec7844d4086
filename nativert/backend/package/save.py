"""`nativert.save`: a delegated program as a .pt2 archive (torch's pt2 format).

The archive holds the top-level program (`models/model.json`, with its weights as raw tensor
bytes); for every lowered module its weight-free reference program
(`models/nativert_segment_N`; its weights are the top-level ones, named by target) and its
payload bytes (`data/executorch/nativert/N.bin`); and the manifest (see manifest.py).
"""

from __future__ import annotations

import json
import os

import torch
from torch.export import ExportedProgram

from nativert._program import WEIGHT_KINDS
from nativert._program.meta import REASON_KEY
from nativert.backend.package.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    TOP,
    program_with_inputs,
)
from nativert.call_delegate import delegate_nodes, lowered_modules
from nativert.delegate import get_delegate, list_delegates
from nativert.errors import NativertError


def save(program: ExportedProgram, path: str | os.PathLike) -> None:
    """Write `program` (with or without delegates) to a .pt2 archive at `path`."""
    from torch.export.pt2_archive._package import package_pt2

    if not isinstance(program, ExportedProgram):
        raise TypeError(f"save needs an ExportedProgram, got {type(program).__name__}")
    known = set(list_delegates())
    segments, payloads, entries = {}, {}, []
    targets = {
        s.arg.name: s.target for s in program.graph_signature.input_specs if s.kind in WEIGHT_KINDS
    }
    for i, (node, lowered) in enumerate(
        zip(delegate_nodes(program), lowered_modules(program), strict=True)
    ):
        segment = lowered.original_module
        specs = [s for s in segment.graph_signature.input_specs if s.kind in WEIGHT_KINDS]
        weights = []
        for spec, arg in zip(specs, node.args[1 : 1 + len(specs)], strict=True):
            source = targets.get(getattr(arg, "name", None))
            if source is None:
                raise NativertError(
                    f"cannot save delegate call {node.name!r}: its weight {spec.target!r} is "
                    "computed in the graph, not a program weight"
                )
            # `source`: the program weight the graph passes (the names differ when a wrapper
            # around a lowered module was exported).
            weights.append(
                {
                    "kind": spec.kind.name,
                    "target": spec.target,
                    "source": source,
                    "persistent": spec.persistent,
                }
            )
        segments[f"nativert_segment_{i}"] = program_with_inputs(segment, [], {})
        payloads[f"nativert/{i}.bin"] = lowered.processed_bytes
        delegate = get_delegate(lowered.backend_id) if lowered.backend_id in known else None
        entries.append(
            {
                "module_name": lowered.module_name,
                "backend_id": lowered.backend_id,
                "delegate_version": delegate.version if delegate else "unknown",
                "toolchain": delegate.toolchain() if delegate else {},
                "compile_specs": [[s.key, s.value] for s in lowered.compile_specs],
                "program": f"nativert_segment_{i}",
                "payload": f"nativert/{i}.bin",
                "weights": weights,
                "inputs": list(segment.graph_signature.user_inputs),
                "outputs": list(segment.graph_signature.user_outputs),
                "mutated_arg_indices": sorted(lowered.mutated_arg_indices),
                "nondifferentiable_outputs": sorted(lowered.nondifferentiable_outputs),
            }
        )
    manifest = {
        "format": "nativert",
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "delegates": entries,
        "reasons": {
            n.name: n.meta[REASON_KEY] for n in program.graph.nodes if REASON_KEY in n.meta
        },
    }
    package_pt2(
        os.fspath(path),
        exported_programs={TOP: program, **segments},
        extra_files={MANIFEST: json.dumps(manifest, indent=1)},
        executorch_files=payloads,
    )

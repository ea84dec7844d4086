"""`nativert.save`: a delegated program as a .pt2 archive (torch's pt2 format).

The archive holds the top-level program (`models/model.json`, with its weights as raw tensor
bytes); for every lowered module its weight-free reference program
(`models/nativert_segment_N`; its weights are the top-level ones, named by target) and its
payload bytes (`data/executorch/nativert/N.bin`); and the manifest (see manifest.py), added
last with the size and SHA-256 of every other member.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile

import torch
from torch.export import ExportedProgram

from nativert._program import WEIGHT_KINDS, copy_graph_module, rebuild_program
from nativert._program.meta import REASON_KEY
from nativert._program.tensors import storage_reach
from nativert.backend.package.archive import digest_members
from nativert.backend.package.manifest import (
    FORMAT_VERSION,
    MANIFEST_MEMBER,
    TOP,
    dim_names,
    program_with_inputs,
)
from nativert.call_delegate import delegate_nodes, lowered_modules
from nativert.delegate import get_delegate, list_delegates
from nativert.errors import NativertError


def save(program: ExportedProgram, path: str | os.PathLike) -> None:
    """Write `program` (with or without delegates) to a .pt2 archive at `path`.

    The file appears whole or not at all (written beside it, then renamed). Its manifest
    records the size and SHA-256 of every other member, which `load` checks.
    """
    from torch.export.pt2_archive._package import package_pt2

    if not isinstance(program, ExportedProgram):
        raise TypeError(f"save needs an ExportedProgram, got {type(program).__name__}")
    segments, payloads, entries = _segments(program)
    manifest = {
        "format": "nativert",
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "delegates": entries,
        "reasons": {
            n.name: n.meta[REASON_KEY] for n in program.graph.nodes if REASON_KEY in n.meta
        },
        "dim_names": dim_names(program),
    }
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    directory = tempfile.mkdtemp(prefix=".nativert-save-", dir=parent)
    try:
        partial = os.path.join(directory, os.path.basename(path))
        package_pt2(
            partial,
            exported_programs={TOP: _trimmed(program), **segments},
            executorch_files=payloads,
        )
        manifest["members"] = digest_members(partial)
        with zipfile.ZipFile(partial) as archive:
            root = archive.namelist()[0].split("/", 1)[0]
        with zipfile.ZipFile(partial, "a") as archive:
            archive.writestr(f"{root}/{MANIFEST_MEMBER}", json.dumps(manifest, indent=1))
        os.replace(partial, path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _segments(program: ExportedProgram) -> tuple[dict, dict, list]:
    """Each delegate's weight-free program, its payload and its manifest entry."""
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
                "accuracy": None if lowered.accuracy is None else lowered.accuracy.to_json(),
            }
        )
    return segments, payloads, entries


def _trimmed(program: ExportedProgram) -> ExportedProgram:
    """The program with every weight storage cut to the bytes its tensors reach.

    torch writes whole storages; a loader that refuses members larger than their tensors
    (so a bomb cannot hide behind a small tensor) needs them exact. Tensors that share a
    storage keep sharing the trimmed one, so aliasing is kept.
    """
    tensors = {**program.state_dict, **program.constants}
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel():
            key = (t.untyped_storage().data_ptr(), t.device, t.dtype)
            groups.setdefault(key, []).append(name)
    new = {}
    for names in groups.values():
        views = [tensors[n] for n in names]
        low = min(v.storage_offset() for v in views)
        high = max(storage_reach(v.shape, v.stride(), v.storage_offset()) for v in views)
        first = views[0]
        total = first.untyped_storage().nbytes() // first.element_size()
        if low == 0 and high == total:
            continue
        flat = torch.empty(0, dtype=first.dtype, device=first.device)
        flat.set_(first.untyped_storage(), 0, (total,), (1,))
        kept = flat[low:high].clone()
        for name, view in zip(names, views, strict=True):
            trimmed = kept.as_strided(view.shape, view.stride(), view.storage_offset() - low)
            if isinstance(view, torch.nn.Parameter):
                trimmed = torch.nn.Parameter(trimmed, requires_grad=view.requires_grad)
            new[name] = trimmed
    if not new:
        return program
    return rebuild_program(program, copy_graph_module(program), new_weights=new)

"""`to_backend`: delegate parts of an ExportedProgram, or all of it, to real runtimes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, overload

from torch.export import ExportedProgram

from nativert._program import copy_graph_module, rebuild_program
from nativert.backend.cache import payload_cache
from nativert.backend.delegate import dict_to_specs, get_delegate, list_delegates, require_available
from nativert.backend.lowering import compile_segment, lower_tagged_program
from nativert.errors import LoweringError, PartitionError
from nativert.lowered import LoweredBackendModule
from nativert.partitioner.base import DelegationSpec, Partitioner
from nativert.partitioner.capability import CapabilityPartitioner, op_name
from nativert.passes import DEFAULT_PIPELINE, decompose_to_core_aten, run_passes
from nativert.passes.manager import Pass


@overload
def to_backend(
    program: ExportedProgram,
    partitioner: Partitioner | None = None,
    *,
    passes: Sequence[Pass | tuple[str, Pass]] | None = None,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = "default",
    progress: bool = False,
) -> ExportedProgram: ...


@overload
def to_backend(
    backend_id: str,
    program: ExportedProgram,
    *,
    compile_specs: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = "default",
) -> LoweredBackendModule: ...


def to_backend(first: Any, second: Any = None, **kwargs: Any) -> Any:
    """Delegate a program to backends.

    `to_backend(ep, partitioner=None, passes=None)` decomposes `ep` to functional core ATen,
    runs the pass pipeline (`passes=None`: nativert.passes.DEFAULT_PIPELINE; `[]`: none),
    partitions it (default: every node to the highest-priority available delegate that
    supports it) and returns an ExportedProgram whose regions run through `call_delegate`.
    A region whose delegate fails to compile stays in PyTorch with a logged warning and the
    reason in the delegation report; `strict=True` raises DelegateCompileError instead. The
    program passed in is not modified. Compiled payloads are cached on disk (`cache_dir`:
    "default" is $NATIVERT_CACHE_DIR or ~/.cache/nativert, shared with torch.compile; None
    turns the cache off). `progress=True` shows a progress bar (tqdm, on stderr) over the
    regions as they compile. `to_backend("eager", ep)` lowers the whole program to
    one delegate and returns a LoweredBackendModule; calling it runs the program.

    Example::

        ep = torch.export.export(model, (x,))
        delegated = nativert.to_backend(ep)
        delegated.module()(x)
    """
    if isinstance(first, str):
        return _lower_whole(first, second, **kwargs)
    if isinstance(first, ExportedProgram):
        return _lower_partitioned(first, second, **kwargs)
    raise TypeError(
        "to_backend takes (ExportedProgram, partitioner=None) or (backend_id: str, "
        f"ExportedProgram), got ({type(first).__name__}, {type(second).__name__})"
    )


def _preserved_ops(backend_ids: Sequence[str]) -> frozenset:
    ops: frozenset = frozenset()
    for backend_id in backend_ids:
        ops |= get_delegate(backend_id).ops_to_preserve()
    return ops


def _fingerprint(program: ExportedProgram) -> list[tuple[str, str, str]]:
    return [(n.name, n.op, str(n.target)) for n in program.graph.nodes]


def prepare_program(
    program: ExportedProgram,
    candidates: Sequence[str],
    passes: Sequence[Pass | tuple[str, Pass]] | None,
    *,
    decompose: bool = True,
) -> ExportedProgram:
    """Decompose and run the pass pipeline; return a program of our own to tag and rewrite.

    Segments must be functional (mutations stay outside them), so a program still in training
    IR is functionalized even when `passes=[]` turns the pipeline off. `decompose=False`: the
    program is functional core ATen already (aot_autograd's graphs).
    """
    if not decompose:
        passes = DEFAULT_PIPELINE if passes is None else passes
    elif passes is None:
        preserve = _preserved_ops(candidates)
        program = decompose_to_core_aten(program, preserve=preserve).program
        passes = DEFAULT_PIPELINE
    elif program.verifiers[0].dialect != "ATEN":
        program = program.run_decompositions({})
    program = run_passes(program, passes).program
    # Partitioners tag, and lowering rewrites, a copy: never the caller's graph.
    return rebuild_program(program, copy_graph_module(program))


def _lower_partitioned(
    program: ExportedProgram,
    partitioner: Partitioner | None = None,
    *,
    passes: Sequence[Pass | tuple[str, Pass]] | None = None,
    strict: bool = False,
    cache_dir: str | os.PathLike | None = "default",
    progress: bool = False,
) -> ExportedProgram:
    cache = payload_cache(cache_dir)
    if partitioner is None:
        partitioner = CapabilityPartitioner()
    if isinstance(partitioner, str):  # str has a .partition method: catch it by name
        raise TypeError(
            f"to_backend(program, {partitioner!r}): the second argument is a partitioner. "
            f"To lower the whole program to one delegate write to_backend({partitioner!r}, "
            f"program); to delegate what it supports use AllNodePartitioner({partitioner!r})"
        )
    if not isinstance(partitioner, Partitioner):
        raise TypeError(
            f"partitioner must have a partition(program) method, got {type(partitioner).__name__}"
        )
    candidates = getattr(partitioner, "delegates", None) or list_delegates(available_only=True)
    program = prepare_program(program, candidates, passes)

    before = _fingerprint(program)
    result = partitioner.partition(program)
    tagged = result.tagged_program
    if tagged is not program or _fingerprint(tagged) != before:
        raise PartitionError(
            f"partitioner {type(partitioner).__name__} changed the program; partitioners may "
            "only set node.meta['delegation_tag'] on the program they are given"
        )
    if not progress or not result.tags:
        return lower_tagged_program(tagged, result.tags, strict=strict, cache=cache)
    from tqdm import tqdm

    with tqdm(total=len(result.tags), desc="compiling partitions", unit="region") as bar:

        def advance(tag: str, spec: DelegationSpec) -> None:
            bar.set_postfix_str(f"{tag} ({spec.backend_id})")
            bar.update(1)

        return lower_tagged_program(
            tagged, result.tags, strict=strict, cache=cache, on_region=advance
        )


def _lower_whole(
    backend_id: str,
    program: ExportedProgram,
    *,
    compile_specs: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = "default",
) -> LoweredBackendModule:
    cache = payload_cache(cache_dir)
    if not isinstance(program, ExportedProgram):
        raise TypeError(
            f"to_backend({backend_id!r}, program) needs an ExportedProgram, "
            f"got {type(program).__name__}"
        )
    delegate = get_delegate(backend_id)
    require_available(delegate)
    program = decompose_to_core_aten(program, preserve=delegate.ops_to_preserve()).program
    unsupported = []
    for node in program.graph.nodes:
        if node.op == "call_function":
            reason = delegate.check_support(node)
            if reason is not None:
                unsupported.append(f"{node.name} ({op_name(node.target)}): {reason}")
    if unsupported:
        shown = "\n  ".join(unsupported[:10])
        more = f"\n  ... and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
        raise LoweringError(
            f"delegate {backend_id!r} cannot run the whole program; unsupported nodes:\n  "
            f"{shown}{more}\nuse to_backend(program, partitioner) to delegate only what it "
            "supports"
        )
    spec = DelegationSpec(backend_id, tuple(dict_to_specs(compile_specs)))
    return compile_segment(program, spec, f"{backend_id}_program", owns_weights=True, cache=cache)

"""The one shared lowering step: tagged regions -> LoweredBackendModule + call_delegate.

Given a functional ExportedProgram whose nodes carry node.meta["delegation_tag"] and a
lowering plan (plan.py: per tag, the delegate, its compile specs, any payload compiled
already), each tagged region is fused into a submodule, turned into its own ExportedProgram
(the segment's reference program), compiled by its delegate, and replaced by `get_attr` +
`call_delegate` + getitems. The jobs, one file each: segments.py (tags, fusing, segment
programs and their weights), compile.py (preprocess, the payload cache, the trial load),
surgery.py (installing a delegate call, or putting a region back), salvage.py (a region that
fails to compile, piece by piece), hybrid.py (specs for delegates that share the cores).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from torch.export import ExportedProgram

from nativert._program import rebuild_program, remember_input_names
from nativert._program.meta import NOTE_KEY
from nativert.backend.cache import PayloadCache
from nativert.backend.lowering.compile import compile_segment
from nativert.backend.lowering.hybrid import embedded_settings, hybrid_specs, with_hybrid_specs
from nativert.backend.lowering.salvage import Salvage
from nativert.backend.lowering.segments import (
    FusedRegion,
    check_tags,
    fuse_copy,
    fuse_region,
    region_segments,
)
from nativert.backend.lowering.surgery import inline, install
from nativert.errors import DelegateCompileError, LoweringError
from nativert.lowered import LoweredBackendModule
from nativert.partitioner.base import DelegationSpec

if TYPE_CHECKING:
    from nativert.backend.plan import RegionPlan

logger = logging.getLogger("nativert")

__all__ = [
    "FusedRegion",
    "check_tags",
    "embedded_settings",
    "compile_segment",
    "fuse_copy",
    "fuse_region",
    "hybrid_specs",
    "lower_tagged_program",
    "region_segments",
    "with_hybrid_specs",
]


def _log_fallback(exc: DelegateCompileError) -> None:
    logger.warning("%s (strict=True raises instead)", exc)


def lower_tagged_program(
    program: ExportedProgram,
    plan: Mapping[str, RegionPlan | DelegationSpec],
    *,
    strict: bool = False,
    cache: PayloadCache | None = None,
    on_fallback: Callable[[DelegateCompileError], None] | None = None,
    on_region: Callable[[str, DelegationSpec], None] | None = None,
    alternatives: Sequence[DelegationSpec] = (),
    min_block_size: int = 1,
) -> ExportedProgram:
    """Replace every tagged region of `program` (modified in place) by a delegate call, as
    `plan` says (a RegionPlan per tag: see plan.py; a bare DelegationSpec is the trivial
    plan).

    A region whose delegate fails to compile it (or whose runtime refuses the result) is
    salvaged piece by piece (see salvage.py): the longest parts that compile stay with its
    delegate, each node that breaks compilation is offered to the `alternatives` (the other
    delegates, in priority order) and otherwise stays in PyTorch with the reason on it, and
    `on_fallback(error)` is called once for the region (default: a logged warning). With
    `strict=True` the first DelegateCompileError is raised instead. `cache`: see
    compile_segment. `on_region(tag, spec)` is called as each region is done (progress).
    `min_block_size`: pieces of a salvaged region with fewer compute nodes stay in PyTorch.
    """
    from nativert.backend.plan import as_plan

    plan = as_plan(plan)
    tags = {tag: p.spec for tag, p in plan.items()}
    regions = check_tags(program, tags)
    gm = program.graph_module
    # Fusing may rename placeholders (stable_topological_sort renames one called `input`).
    remember_input_names(gm)
    index = 0

    def install_piece(tag: str, lowered: LoweredBackendModule, arg_names: list[str]) -> None:
        """Fuse the nodes tagged `tag` and call `lowered` there, checking that the region
        has the arguments, in that order, it was compiled with."""
        nonlocal index
        fused = fuse_region(program, tag, index)
        index += 1
        if fused.arg_names != arg_names:
            raise LoweringError(
                f"internal error: region {tag!r} was compiled with arguments {arg_names} "
                f"but fuses with {fused.arg_names}; please report it"
            )
        install(gm, fused.call_node, lowered, fused.outer_args, tag)

    for tag in regions:
        fused = fuse_region(program, tag, index)
        index += 1
        try:
            lowered = compile_segment(
                fused.segment,
                tags[tag],
                tag,
                mutated_arg_indices=fused.mutated_idx,
                state_arg_indices=fused.state_idx,
                cache=cache,
                payload=plan[tag].payload,
            )
        except DelegateCompileError as exc:
            if strict:
                raise
            nodes = inline(gm, fused.call_node, fused.submodule, fused.outer_args)
            salvage = Salvage(
                program,
                tags[tag],
                tag,
                cache=cache,
                alternatives=alternatives,
                min_block_size=min_block_size,
                install=install_piece,
            )
            (on_fallback or _log_fallback)(salvage.run(nodes, exc))
        else:
            lowered.accuracy = plan[tag].accuracy
            hop_node = install(gm, fused.call_node, lowered, fused.outer_args, tag)
            if plan[tag].note:
                hop_node.meta[NOTE_KEY] = plan[tag].note
        if on_region is not None:
            on_region(tag, tags[tag])

    gm.graph.lint()
    gm.recompile()
    return rebuild_program(program, gm)

"""Regions as segments: a tagged region fused into a submodule and turned into its own
ExportedProgram (the segment's reference program), with its arguments in segment order.

Weights: a parameter, buffer or constant used only by one region (and not mutated) is owned
by that segment: it is a weight in the segment's signature, so the delegate compiles it in.
Anything else (shared weights, mutated buffers, activations) is a plain segment input. In both
cases the top-level program keeps the one tensor and passes it to call_delegate, so nothing
is duplicated in memory and gradients reach every parameter. Mutations stay at the top level.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions, validate_partition

from nativert._program import (
    ARG_NAME_KEY,
    WEIGHT_KINDS,
    copy_graph_module,
    program_from_graph,
    rebuild_program,
)
from nativert._program.meta import SOURCE_OP_KEY, TAG_KEY
from nativert._program.ops import op_name
from nativert.call_delegate import call_delegate
from nativert.errors import PartitionError
from nativert.partitioner.base import DelegationSpec

SEGMENT_PREFIX = "_nativert_segment_"


@dataclasses.dataclass(frozen=True)
class FusedRegion:
    """A region fused into `call_node` (a call_module of `submodule`), as a segment."""

    call_node: Node
    submodule: GraphModule
    segment: ExportedProgram
    outer_args: list[Node]  # the top-level values passed, in segment order (weights first)
    mutated_idx: list[int]  # which of them the top level mutates after the call
    state_idx: list[int]  # which are buffers or constants

    @property
    def arg_names(self) -> list[str]:
        return [signature_name(a) for a in self.outer_args]


def check_tags(
    program: ExportedProgram, tags: Mapping[str, DelegationSpec]
) -> dict[str, list[Node]]:
    """Validate a partitioner's tags; return the tagged call_function nodes per tag."""
    user_inputs = set(program.graph_signature.user_inputs)
    regions: dict[str, list[Node]] = {}
    for node in program.graph.nodes:
        tag = node.meta.get(TAG_KEY)
        if tag is None:
            continue
        if node.op == "output":
            raise PartitionError(
                f"the partitioner tagged the output node with {tag!r}; only compute nodes "
                "can be delegated"
            )
        if node.op == "placeholder":
            if node.name in user_inputs:
                raise PartitionError(
                    f"the partitioner tagged user input {node.name!r} with {tag!r}; inputs "
                    "cannot be delegated, only the nodes that use them"
                )
            continue  # weights: ownership is derived from their users
        if node.op != "call_function":
            continue
        if node.target is call_delegate:
            raise PartitionError(
                f"the partitioner tagged {node.name!r} with {tag!r}, but it is already a "
                "delegate call; leave call_delegate nodes untagged"
            )
        if tag not in tags:
            raise PartitionError(
                f"node {node.name!r} ({node.target}) is tagged {tag!r}, which is not in the "
                f"partition result's tags {sorted(tags)}"
            )
        regions.setdefault(tag, []).append(node)
    return regions


def signature_name(node: Node) -> str:
    """The name a top-level node has in the program's signature (fusing may rename it)."""
    return node.meta.get(ARG_NAME_KEY, node.name) if node.op == "placeholder" else node.name


def _segment_program(
    program: ExportedProgram,
    sub_gm: GraphModule,
    outer_args: tuple[Node, ...],
    owner_call: Node,
) -> tuple[ExportedProgram, list[Node], list[int], list[int]]:
    """Build the segment's ExportedProgram; return it, the outer args in its order, which of
    them the top level mutates after the call, and which are buffers or constants."""
    sig = program.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    mutated_buffers = set(sig.buffers_to_mutate.values())
    mutated_inputs = set(sig.user_inputs_to_mutate.values())
    mutated_names = {
        spec.arg.name
        for spec in sig.input_specs
        if (spec.kind == InputKind.BUFFER and spec.target in mutated_buffers)
        or (spec.kind == InputKind.USER_INPUT and spec.arg.name in mutated_inputs)
    }

    placeholders = [n for n in sub_gm.graph.nodes if n.op == "placeholder"]
    owned, inputs = [], []
    for inner, outer in zip(placeholders, outer_args, strict=True):
        spec = kinds.get(signature_name(outer)) if outer.op == "placeholder" else None
        is_owned = (
            spec is not None
            and spec.kind in WEIGHT_KINDS
            and signature_name(outer) not in mutated_names
            and set(outer.users) == {owner_call}
        )
        (owned if is_owned else inputs).append((inner, outer, spec))
    kind_order = {InputKind.PARAMETER: 0, InputKind.BUFFER: 1, InputKind.CONSTANT_TENSOR: 2}
    owned.sort(key=lambda item: kind_order[item[2].kind])
    ordered = owned + inputs

    # Weights first, then inputs: ExportedProgram's placeholder order.
    anchor = next(n for n in sub_gm.graph.nodes if n.op != "placeholder")
    _views_to_reshapes(sub_gm)
    for inner, _, _ in ordered:
        anchor.prepend(inner)

    sub_gm.graph.lint()
    sub_gm.recompile()
    segment = program_from_graph(
        sub_gm,
        [spec for _, _, spec in owned],
        {**program.state_dict, **program.constants},
        range_constraints=program.range_constraints,
        verifiers=program.verifiers,
    )
    outer_ordered = [outer for _, outer, _ in ordered]
    names = [signature_name(outer) for outer in outer_ordered]
    mutated_idx = [i for i, name in enumerate(names) if name in mutated_names]
    state_kinds = (InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    state_idx = [
        i for i, name in enumerate(names) if name in kinds and kinds[name].kind in state_kinds
    ]
    return segment, outer_ordered, mutated_idx, state_idx


def _views_to_reshapes(gm: GraphModule) -> None:
    """A segment keeps no `view`: each becomes `reshape`, which is the same view wherever
    one exists and a copy otherwise.

    A view recorded at export is valid for the strides the kernels had then, and some
    kernels' output layout depends on how they are traced. SDPA's CPU flash kernel returns
    its output sequence-major and the math kernel (chosen when inputs require grad, as when
    torch.onnx.export or the gradient probe retrace a segment) head-major, so T5's
    `transpose(1, 2)` then `view` fails on the retrace. Segments are functional, so the
    rewrite changes no value."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            node.meta[SOURCE_OP_KEY] = op_name(torch.ops.aten.view.default)


def fuse_region(program: ExportedProgram, tag: str, index: int):
    """Fuse region `tag` of `program` (in place) into a call_module node (see FusedRegion)."""
    gm = program.graph_module
    # fuse_by_partitions rebuilds gm.graph (stable_topological_sort makes new Nodes), so
    # each region is collected from the current graph, not from before earlier fusions.
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.meta.get(TAG_KEY) == tag]
    if not validate_partition(nodes):
        raise PartitionError(
            f"region {tag!r} ({len(nodes)} nodes, e.g. {[n.name for n in nodes[:5]]}) "
            "cannot be fused: a path leaves it and comes back, so fusing would create a "
            "cycle; split it into regions that are closed under such paths"
        )
    fuse_by_partitions(
        gm,
        [dict.fromkeys(nodes)],
        prefix=f"{SEGMENT_PREFIX}{index}_",
        always_return_tuple=True,
    )
    call_node = next(
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and n.target.startswith(f"{SEGMENT_PREFIX}{index}_")
    )
    sub_gm = getattr(gm, call_node.target)
    segment, outer_args, mutated_idx, state_idx = _segment_program(
        program, sub_gm, call_node.args, call_node
    )
    return FusedRegion(call_node, sub_gm, segment, outer_args, mutated_idx, state_idx)


def region_segments(
    program: ExportedProgram,
    tags: Mapping[str, DelegationSpec],
    *,
    only: Sequence[str] | None = None,
) -> dict[str, tuple[ExportedProgram, list[str]]]:
    """Per tag (of `only`, default all), the segment program lowering would compile and
    the names its arguments have in `program` (weights first, then inputs). Each region is
    fused alone, on a copy: `program` is not modified."""
    regions = check_tags(program, tags)
    segments = {}
    for tag, nodes in regions.items():
        if only is not None and tag not in only:
            continue
        fused = fuse_copy(program, tag, {n.name for n in nodes})
        segments[tag] = (fused.segment, fused.arg_names)
    return segments


def fuse_copy(program: ExportedProgram, tag: str, names: set[str]):
    """`fuse_region` of the nodes named `names`, tagged `tag`, on a copy of `program` (every
    other tag dropped there); `program` is not modified."""
    copy = rebuild_program(program, copy_graph_module(program))
    for node in copy.graph.nodes:
        if node.name in names:
            node.meta[TAG_KEY] = tag
        else:
            node.meta.pop(TAG_KEY, None)
    return fuse_region(copy, tag, 0)

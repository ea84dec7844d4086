"""The one shared lowering step: tagged regions -> LoweredBackendModule + call_delegate.

Given a functional ExportedProgram whose nodes carry node.meta["delegation_tag"], each tagged
region is fused into a submodule, turned into its own ExportedProgram (the segment's reference
program), compiled by its delegate, and replaced by `get_attr` + `call_delegate` + getitems.

Weights: a parameter, buffer or constant used only by one region (and not mutated) is owned
by that segment: it is a weight in the segment's signature, so the delegate compiles it in.
Anything else (shared weights, mutated buffers, activations) is a plain segment input. In both
cases the top-level program keeps the one tensor and passes it to call_delegate, so nothing
is duplicated in memory and gradients reach every parameter. Mutations stay at the top level.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

from torch.export import ExportedProgram
from torch.export.graph_signature import (
    InputKind,
)
from torch.fx import GraphModule, Node
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions, validate_partition

from nativert._program import (
    ARG_NAME_KEY,
    WEIGHT_KINDS,
    copy_graph_module,
    program_from_graph,
    rebuild_program,
    remember_input_names,
)
from nativert._program.meta import REASON_KEY, TAG_KEY, TUNING_KEY
from nativert.backend.cache import PayloadCache, segment_key
from nativert.call_delegate import HOP_NAME, call_delegate
from nativert.delegate import dict_to_specs, get_delegate, require_available
from nativert.errors import DelegateCompileError, PartitionError
from nativert.lowered import LoweredBackendModule
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.settings import Settings

_SEGMENT_PREFIX = "_nativert_segment_"
logger = logging.getLogger("nativert")


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


def _signature_name(node: Node) -> str:
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
        spec = kinds.get(_signature_name(outer)) if outer.op == "placeholder" else None
        is_owned = (
            spec is not None
            and spec.kind in WEIGHT_KINDS
            and _signature_name(outer) not in mutated_names
            and set(outer.users) == {owner_call}
        )
        (owned if is_owned else inputs).append((inner, outer, spec))
    kind_order = {InputKind.PARAMETER: 0, InputKind.BUFFER: 1, InputKind.CONSTANT_TENSOR: 2}
    owned.sort(key=lambda item: kind_order[item[2].kind])
    ordered = owned + inputs

    # Weights first, then inputs: ExportedProgram's placeholder order.
    anchor = next(n for n in sub_gm.graph.nodes if n.op != "placeholder")
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
    names = [_signature_name(outer) for outer in outer_ordered]
    mutated_idx = [i for i, name in enumerate(names) if name in mutated_names]
    state_kinds = (InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    state_idx = [
        i for i, name in enumerate(names) if name in kinds and kinds[name].kind in state_kinds
    ]
    return segment, outer_ordered, mutated_idx, state_idx


def compile_segment(
    segment: ExportedProgram,
    spec: DelegationSpec,
    tag: str,
    *,
    owns_weights: bool = False,
    mutated_arg_indices: Sequence[int] = (),
    state_arg_indices: Sequence[int] = (),
    cache: PayloadCache | None = None,
    payload: bytes | None = None,
) -> LoweredBackendModule:
    """Run the delegate's preprocess on `segment` and wrap the payload in a lowered module.

    With a `cache`, a payload compiled before for the same segment, specs and versions is
    reused instead of compiling again, for delegates that declare `cacheable = True` (their
    payloads depend only on what the key covers: never on weight values). A `payload`
    compiled earlier for this very segment (autotune's) is used as it is."""
    if payload is not None:
        return _lowered(
            segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
        )
    delegate = get_delegate(spec.backend_id)
    require_available(delegate)
    key = None
    if not delegate.cacheable:
        cache = None  # its payload may depend on more than the key (e.g. weight values)
    if cache is not None:
        versions = {"delegate": delegate.version, **delegate.toolchain()}
        key = segment_key(segment, spec.backend_id, versions, spec.compile_specs)
        payload = cache.get(key)
        if payload is not None:
            return _lowered(
                segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
            )
    try:
        payload = delegate.preprocess(segment, list(spec.compile_specs))
    except Exception as exc:
        ops = sorted({str(n.target) for n in segment.graph.nodes if n.op == "call_function"})
        detail = (
            str(exc) if isinstance(exc, DelegateCompileError) else f"{type(exc).__name__}: {exc}"
        )
        raise DelegateCompileError(
            f"delegate {spec.backend_id!r} failed to compile segment {tag!r} "
            f"(ops: {', '.join(ops)}): {detail}"
        ) from exc
    if cache is not None:
        cache.put(key, payload)
    return _lowered(
        segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
    )


def _lowered(segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices):
    return LoweredBackendModule(
        backend_id=spec.backend_id,
        processed_bytes=payload,
        compile_specs=list(spec.compile_specs),
        original_module=segment,
        module_name=tag,
        owns_weights=owns_weights,
        mutated_arg_indices=mutated_arg_indices,
        state_arg_indices=state_arg_indices,
    )


def _log_fallback(exc: DelegateCompileError) -> None:
    logger.warning("%s; the region stays in PyTorch (strict=True raises instead)", exc)


def _inline(gm: GraphModule, call_node: Node, sub_gm: GraphModule, outer_args, reason: str):
    """Put a fused region's nodes back in place of its call_module node (kept in PyTorch)."""
    env = dict(
        zip([n for n in sub_gm.graph.nodes if n.op == "placeholder"], outer_args, strict=True)
    )
    with gm.graph.inserting_before(call_node):
        for node in sub_gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            copy = gm.graph.node_copy(node, env.__getitem__)
            copy.meta.pop(TAG_KEY, None)
            copy.meta[REASON_KEY] = reason
            env[node] = copy
    outputs = sub_gm.graph.output_node().args[0]
    for user in list(call_node.users):  # the getitems fusing created
        user.replace_all_uses_with(env[outputs[user.args[1]]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(call_node)
    gm.delete_submodule(call_node.target)


def _install(
    gm: GraphModule, call_node: Node, lowered: LoweredBackendModule, outer_args, tag
) -> Node:
    """Replace a fused region's call_module node by get_attr + call_delegate."""
    attr, n = f"lowered_{tag}", 0
    while hasattr(gm, attr):  # a program lowered again keeps its earlier delegates
        n += 1
        attr = f"lowered_{tag}_{n}"
    gm.add_submodule(attr, lowered)
    with gm.graph.inserting_before(call_node):
        module_node = gm.graph.get_attr(attr)
        hop_node = gm.graph.create_node(
            "call_function",
            call_delegate,
            (module_node, *outer_args),
            name=f"{HOP_NAME}_{tag}",
        )
    hop_node.meta.update(call_node.meta)
    hop_node.meta[TAG_KEY] = tag
    call_node.replace_all_uses_with(hop_node)
    gm.graph.erase_node(call_node)
    gm.delete_submodule(call_node.target)
    return hop_node


def _fuse_region(program: ExportedProgram, tag: str, index: int):
    """Fuse region `tag` of `program` (in place) into a call_module node; return that node,
    its submodule, the segment program, the outer args in segment order, and which of them
    are mutated after the call / are buffers or constants."""
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
        prefix=f"{_SEGMENT_PREFIX}{index}_",
        always_return_tuple=True,
    )
    call_node = next(
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and n.target.startswith(f"{_SEGMENT_PREFIX}{index}_")
    )
    sub_gm = getattr(gm, call_node.target)
    segment, outer_args, mutated_idx, state_idx = _segment_program(
        program, sub_gm, call_node.args, call_node
    )
    return call_node, sub_gm, segment, outer_args, mutated_idx, state_idx


def region_segments(
    program: ExportedProgram, tags: Mapping[str, DelegationSpec]
) -> dict[str, tuple[ExportedProgram, list[str]]]:
    """Per tag, the segment program lowering would compile and the names its arguments
    have in `program` (weights first, then inputs). Each region is fused alone, on a copy:
    `program` is not modified."""
    regions = check_tags(program, tags)
    segments = {}
    for tag in regions:
        copy = rebuild_program(program, copy_graph_module(program))
        for node in copy.graph.nodes:
            if node.meta.get(TAG_KEY) != tag:
                node.meta.pop(TAG_KEY, None)
        _, _, segment, outer_args, _, _ = _fuse_region(copy, tag, 0)
        segments[tag] = (segment, [_signature_name(a) for a in outer_args])
    return segments


def lower_tagged_program(
    program: ExportedProgram,
    tags: Mapping[str, DelegationSpec],
    *,
    strict: bool = False,
    cache: PayloadCache | None = None,
    on_fallback: Callable[[DelegateCompileError], None] | None = None,
    on_region: Callable[[str, DelegationSpec], None] | None = None,
    precompiled: Mapping[str, bytes] | None = None,
    notes: Mapping[str, str] | None = None,
) -> ExportedProgram:
    """Replace every tagged region of `program` (modified in place) by a delegate call.

    A region whose delegate fails to compile stays in PyTorch, with the reason on its nodes
    (so the delegation report shows it) and `on_fallback(error)` called (default: a logged
    warning); with `strict=True` the DelegateCompileError is raised instead. `cache`: see
    compile_segment. `on_region(tag, spec)` is called as each region is done (progress).
    `precompiled`: payloads already compiled for some tags (autotune's winners), used as
    they are. `notes`: per tag, a line for the report (autotune's measurements).
    """
    regions = check_tags(program, tags)
    gm = program.graph_module
    notes = notes or {}
    # Fusing may rename placeholders (stable_topological_sort renames one called `input`).
    remember_input_names(gm)

    for index, tag in enumerate(regions):
        call_node, sub_gm, segment, outer_args, mutated_idx, state_idx = _fuse_region(
            program, tag, index
        )
        try:
            lowered = compile_segment(
                segment,
                tags[tag],
                tag,
                mutated_arg_indices=mutated_idx,
                state_arg_indices=state_idx,
                cache=cache,
                payload=(precompiled or {}).get(tag),
            )
        except DelegateCompileError as exc:
            if strict:
                raise
            (on_fallback or _log_fallback)(exc)
            _inline(gm, call_node, sub_gm, outer_args, f"{exc}; kept in PyTorch")
            lowered = None
        if on_region is not None:
            on_region(tag, tags[tag])
        if lowered is not None:
            hop_node = _install(gm, call_node, lowered, outer_args, tag)
            if tag in notes:
                hop_node.meta[TUNING_KEY] = notes[tag]

    gm.graph.lint()
    gm.recompile()
    return rebuild_program(program, gm)


def hybrid_specs(result: PartitionResult, settings: Settings) -> PartitionResult:
    """Add each delegate's `hybrid_compile_specs` when the program runs more than one region
    or leaves compute in PyTorch (keys the settings set win)."""
    from nativert.partitioner.capability import is_compute, produces_tensors

    tags = result.tags
    program = result.tagged_program
    kept = any(
        n.op == "call_function" and TAG_KEY not in n.meta and is_compute(n) and produces_tensors(n)
        for n in program.graph.nodes
    )
    if len(tags) < 2 and not kept:
        return result
    new = {}
    for tag, spec in tags.items():
        extra = get_delegate(spec.backend_id).hybrid_compile_specs
        given = settings.compile_specs.get(spec.backend_id, {})
        specs = {s.key: s.value for s in spec.compile_specs}
        for key, value in extra.items():
            if key not in given:
                specs.setdefault(key, value)
        new[tag] = dataclasses.replace(spec, compile_specs=tuple(dict_to_specs(specs)))
    return PartitionResult(program, new)

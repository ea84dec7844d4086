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
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
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
from nativert._program.meta import NOTE_KEY, REASON_KEY, SOURCE_OP_KEY, TAG_KEY
from nativert.backend.cache import PayloadCache, segment_key
from nativert.call_delegate import HOP_NAME, call_delegate
from nativert.delegate import dict_to_specs, get_delegate, require_available
from nativert.errors import (
    DelegateCompileError,
    DelegateLoadError,
    LoweringError,
    PartitionError,
    first_line,
)
from nativert.lowered import LoweredBackendModule
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.partitioner.capability import is_compute, op_name, produces_tensors
from nativert.settings import Settings

if TYPE_CHECKING:
    from nativert.backend.plan import RegionPlan

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
    names = [_signature_name(outer) for outer in outer_ordered]
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
        detail = first_line(exc) if isinstance(exc, DelegateCompileError) else _detail(exc)
        raise DelegateCompileError(
            f"delegate {spec.backend_id!r} failed to compile segment {tag!r} "
            f"({_ops_summary(segment)}): {detail}"
        ) from exc
    lowered = _lowered(
        segment, spec, tag, payload, owns_weights, mutated_arg_indices, state_arg_indices
    )
    _check_loads(lowered, segment)
    if cache is not None:
        cache.put(key, payload)  # only payloads the runtime accepted
    return lowered


def _detail(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def _ops_summary(segment: ExportedProgram, shown: int = 4) -> str:
    nodes = [n for n in segment.graph.nodes if n.op == "call_function"]
    ops = sorted({op_name(n.target) for n in nodes})
    more = f" and {len(ops) - shown} more" if len(ops) > shown else ""
    return f"{len(nodes)} nodes: {', '.join(ops[:shown])}{more}"


def _check_loads(lowered: LoweredBackendModule, segment: ExportedProgram) -> None:
    """Build the module's executor now, bound to the segment's weights (`.module()` and
    dense calls then use it): a payload its runtime refuses (ONNX Runtime's shape inference,
    a library that does not load) is a compile failure, found while the region can still
    stay in PyTorch, and never cached."""
    try:
        lowered.executor  # noqa: B018  (builds it)
    except Exception as exc:
        raise DelegateCompileError(
            f"delegate {lowered.backend_id!r} compiled segment {lowered.module_name!r} "
            f"({_ops_summary(segment)}), but its runtime refused the result: "
            + (first_line(exc) if isinstance(exc, DelegateLoadError) else _detail(exc))
        ) from exc


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
    logger.warning("%s (strict=True raises instead)", exc)


def _inline(gm: GraphModule, call_node: Node, sub_gm: GraphModule, outer_args) -> dict[str, Node]:
    """Put a fused region's nodes back in place of its call_module node (untagged); return
    the new nodes by the names they had in the region (fusing may rename them)."""
    env = dict(
        zip([n for n in sub_gm.graph.nodes if n.op == "placeholder"], outer_args, strict=True)
    )
    copies: dict[str, Node] = {}
    with gm.graph.inserting_before(call_node):
        for node in sub_gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            copy = gm.graph.node_copy(node, env.__getitem__)
            copy.meta.pop(TAG_KEY, None)
            env[node] = copies[node.name] = copy
    outputs = sub_gm.graph.output_node().args[0]
    for user in list(call_node.users):  # the getitems fusing created
        user.replace_all_uses_with(env[outputs[user.args[1]]])
        gm.graph.erase_node(user)
    gm.graph.erase_node(call_node)
    gm.delete_submodule(call_node.target)
    return copies


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
        _, _, segment, outer_args, _, _ = _fuse_copy(program, tag, {n.name for n in nodes})
        segments[tag] = (segment, [_signature_name(a) for a in outer_args])
    return segments


def _fuse_copy(program: ExportedProgram, tag: str, names: set[str]):
    """`_fuse_region` of the nodes named `names`, tagged `tag`, on a copy of `program` (every
    other tag dropped there); `program` is not modified."""
    copy = rebuild_program(program, copy_graph_module(program))
    for node in copy.graph.nodes:
        if node.name in names:
            node.meta[TAG_KEY] = tag
        else:
            node.meta.pop(TAG_KEY, None)
    return _fuse_region(copy, tag, 0)


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
    salvaged piece by piece (see `_Salvage`): the longest parts that compile stay with its
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

    def install(tag: str, lowered: LoweredBackendModule, arg_names: list[str] | None) -> None:
        """Fuse the nodes tagged `tag` and call `lowered` there; with `arg_names`, check
        that the region has the arguments, in that order, it was compiled with."""
        nonlocal index
        call_node, _, _, outer_args, _, _ = _fuse_region(program, tag, index)
        index += 1
        names = [_signature_name(a) for a in outer_args]
        if arg_names is not None and names != arg_names:
            raise LoweringError(
                f"internal error: region {tag!r} was compiled with arguments {arg_names} "
                f"but fuses with {names}; please report it"
            )
        _install(gm, call_node, lowered, outer_args, tag)

    for tag in regions:
        call_node, sub_gm, segment, outer_args, mutated_idx, state_idx = _fuse_region(
            program, tag, index
        )
        index += 1
        try:
            lowered = compile_segment(
                segment,
                tags[tag],
                tag,
                mutated_arg_indices=mutated_idx,
                state_arg_indices=state_idx,
                cache=cache,
                payload=plan[tag].payload,
            )
        except DelegateCompileError as exc:
            if strict:
                raise
            nodes = _inline(gm, call_node, sub_gm, outer_args)
            salvage = _Salvage(
                program,
                tags[tag],
                tag,
                cache=cache,
                alternatives=alternatives,
                min_block_size=min_block_size,
                install=install,
            )
            (on_fallback or _log_fallback)(salvage.run(nodes, exc))
        else:
            lowered.accuracy = plan[tag].accuracy
            hop_node = _install(gm, call_node, lowered, outer_args, tag)
            if plan[tag].note:
                hop_node.meta[NOTE_KEY] = plan[tag].note
        if on_region is not None:
            on_region(tag, tags[tag])

    gm.graph.lint()
    gm.recompile()
    return rebuild_program(program, gm)


class _Salvage:
    """Delegate what can be delegated of a region that failed to compile.

    The region's nodes are grouped in units (a node with the getitems that read it) in
    topological order; a prefix or suffix of a region's units is again a region (it cannot
    form a cycle). From the front: the longest prefix that compiles is found by bisection
    (probing first at the node the error names, when it names one) and installed; the unit
    after it is the culprit, offered to the alternative delegates that support it and
    otherwise kept in PyTorch with its error; then the rest, whole first. Each attempt
    compiles on a copy of the program as it is at that moment, so what is installed is what
    was compiled. Attempts per region are bounded; units left when the bound is reached
    stay in PyTorch.
    """

    def __init__(self, program, spec, tag, *, cache, alternatives, min_block_size, install) -> None:
        # Its pieces run between PyTorch nodes and other regions: hybrid specs apply.
        self.program, self.spec, self.tag = program, with_hybrid_specs(spec), tag
        self.failed_backend = spec.backend_id
        self.alternatives = [
            with_hybrid_specs(a) for a in alternatives if a.backend_id != spec.backend_id
        ]
        self.cache, self.min_block_size, self._install = cache, min_block_size, install
        self._count = 0
        self.kept: list[str] = []  # node names left in PyTorch
        self.delegated: dict[str, int] = {}  # piece tag -> nodes

    def _live(self) -> dict[str, Node]:
        return {n.name: n for n in self.program.graph.nodes}  # fusing makes new Nodes

    def run(self, nodes: Mapping[str, Node], error: DelegateCompileError) -> DelegateCompileError:
        """Salvage the region whose (inlined) nodes are `nodes`; return one error that says
        why it failed, what stayed in PyTorch and what was delegated."""
        renamed = {old: new.name for old, new in nodes.items()}
        units = _units(list(nodes.values()))
        budget = 4 * math.ceil(math.log2(len(units) + 1)) + 4
        rest, failing = units, error
        while rest:
            if failing is None:
                compiled, failing = self._attempt(rest, self.spec)
                budget -= 1
                if compiled is not None:
                    self._take(rest, *compiled)
                    break
            # `rest` fails: find the longest prefix that compiles; the unit after it fails.
            lo, hi, best, culprit_error = 0, len(rest), None, failing
            hint = _named_unit(failing, rest, renamed)
            probes = [] if hint is None else [hint, hint + 1]
            while hi - lo > 1 and budget > 0:
                while probes and not lo < probes[0] < hi:
                    probes.pop(0)
                mid = probes.pop(0) if probes else (lo + hi) // 2
                compiled, exc = self._attempt(rest[:mid], self.spec)
                budget -= 1
                if compiled is not None:
                    lo, best = mid, compiled
                else:
                    hi, culprit_error = mid, exc
            if best is not None:
                self._take(rest[:lo], *best)
            if hi - lo > 1:  # out of attempts: the rest stays in PyTorch
                self._keep(rest[lo:], culprit_error, prefix="attempts ran out; ")
                break
            self._offer(rest[lo], culprit_error)
            rest, failing, renamed = rest[lo + 1 :], None, {}
        return self._summary(error)

    def _attempt(self, units, spec):
        """Compile `units` as one region on a copy: ((tag, lowered, arg names), None) or
        (None, the error)."""
        names = {name for unit in units for name in unit}
        self._count += 1
        tag = f"{self.tag}_{self._count}"
        _, _, segment, outer_args, mutated_idx, state_idx = _fuse_copy(self.program, tag, names)
        try:
            lowered = compile_segment(
                segment,
                spec,
                tag,
                mutated_arg_indices=mutated_idx,
                state_arg_indices=state_idx,
                cache=self.cache,
            )
        except DelegateCompileError as exc:
            return None, exc
        return (tag, lowered, [_signature_name(a) for a in outer_args]), None

    def _take(self, units, tag, lowered, arg_names) -> None:
        """Install a compiled piece (or keep it in PyTorch when below min_block_size)."""
        names = [name for unit in units for name in unit]
        live = self._live()
        if sum(is_compute(live[n]) for n in names) < self.min_block_size:
            reason = (
                f"region below min_block_size={self.min_block_size} after region "
                f"{self.tag!r} was split around nodes its delegate failed to compile"
            )
            self._mark(names, reason)
            return
        for name in names:
            live[name].meta[TAG_KEY] = tag
        self._install(tag, lowered, arg_names)
        self.delegated[tag] = len(names)

    def _offer(self, unit: list[str], error: DelegateCompileError) -> None:
        """The culprit, to the first alternative that supports and compiles it, or kept."""
        tried = []
        for spec in self.alternatives:
            delegate = get_delegate(spec.backend_id)
            if not delegate.is_available():
                continue
            live = self._live()
            ops = [live[n] for n in unit if live[n].target is not operator.getitem]
            if any(delegate.check_support(node) is not None for node in ops):
                continue
            compiled, exc = self._attempt([unit], spec)
            if compiled is not None:
                self._take([unit], *compiled)
                return
            tried.append(f"{spec.backend_id}: {_reason(exc)}")
        also = f"; also failed on {'; '.join(tried)}" if tried else ""
        self._keep([unit], error, suffix=also)

    def _keep(self, units, error, *, prefix: str = "", suffix: str = "") -> None:
        reason = (
            f"{prefix}delegate {self.failed_backend!r} failed to compile it "
            f"(region {self.tag!r}): {_reason(error)}{suffix}"
        )
        self._mark([name for unit in units for name in unit], reason)

    def _mark(self, names: list[str], reason: str) -> None:
        live = self._live()
        for name in names:
            live[name].meta[REASON_KEY] = reason
        self.kept.extend(names)

    def _summary(self, error: DelegateCompileError) -> DelegateCompileError:
        live = self._live()
        kept = self.kept
        shown = ", ".join(f"{name} ({op_name(live[name].target)})" for name in kept[:4])
        if len(kept) > 4:
            shown += f" and {len(kept) - 4} more"
        message = f"{error}; kept in PyTorch: {shown or 'nothing'}"
        if self.delegated:
            message += (
                f"; the other {sum(self.delegated.values())} node(s) delegated in "
                f"{len(self.delegated)} region(s)"
            )
        summary = DelegateCompileError(message)
        summary.__cause__ = error
        return summary


def _units(nodes: list[Node]) -> list[list[str]]:
    """Nodes in topological order, each with the getitems that read it (kept together)."""
    members = set(nodes)
    units: list[list[str]] = []
    owner: dict[Node, list[str]] = {}
    for node in nodes:
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(source, Node) and source in owner:
            owner[source].append(node.name)
            continue
        unit = [node.name]
        units.append(unit)
        if source is None or source not in members:
            owner[node] = unit
    return units


_NAMED = re.compile(r"(?:%|node '|Node ')(\w+)")


def _named_unit(error: BaseException, units: list[list[str]], renamed: Mapping[str, str]):
    """The index of the unit holding the first node an error (or its causes) names."""
    where = {name: i for i, unit in enumerate(units) for name in unit}
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for name in _NAMED.findall(str(error)):
            index = where.get(renamed.get(name, name))
            if index is not None:
                return index
        error = error.__cause__ or error.__context__
    return None


def _reason(error: DelegateCompileError | None) -> str:
    """What failed, without the segment's own description (the report names the node)."""
    text = first_line(error) if error is not None else "unknown error"
    text = re.sub(r"^delegate '[^']*' failed to compile segment '[^']*' \([^)]*\): ", "", text)
    return re.sub(
        r"^delegate '[^']*' compiled segment '[^']*' \([^)]*\), but (its runtime)",
        r"\1",
        text,
    )


def with_hybrid_specs(
    spec: DelegationSpec, given: Mapping[str, object] | None = None
) -> DelegationSpec:
    """`spec` plus its delegate's `hybrid_compile_specs` for keys neither it nor `given` (the
    settings' compile specs for that delegate) sets."""
    specs = {s.key: s.value for s in spec.compile_specs}
    extra = get_delegate(spec.backend_id).hybrid_compile_specs
    given = given or {}
    missing = {k: v for k, v in extra.items() if k not in specs and k not in given}
    if not missing:
        return spec
    return dataclasses.replace(spec, compile_specs=tuple(dict_to_specs({**specs, **missing})))


def hybrid_specs(result: PartitionResult, settings: Settings) -> PartitionResult:
    """Add each delegate's `hybrid_compile_specs` when the program runs more than one region
    or leaves compute in PyTorch (keys the settings set win)."""
    tags = result.tags
    program = result.tagged_program
    kept = any(
        n.op == "call_function" and TAG_KEY not in n.meta and is_compute(n) and produces_tensors(n)
        for n in program.graph.nodes
    )
    if len(tags) < 2 and not kept:
        return result
    new = {
        tag: with_hybrid_specs(spec, settings.compile_specs.get(spec.backend_id, {}))
        for tag, spec in tags.items()
    }
    return PartitionResult(program, new)

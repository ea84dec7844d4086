"""CapabilityPartitioner: each node goes to the first delegate that supports it.

Regions of one delegate are grown by torch's CapabilityBasedPartitioner, which never creates
a cycle within a delegate. Regions of different delegates can still form a cycle together
(A feeds B feeds A); such cycles are broken by sending the smaller region back to PyTorch.
Every call_function node that stays in PyTorch records why in
node.meta["nativert_not_delegated"].
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from nativert._program.meta import INPUT_KIND_KEY, PIN_KEY, REASON_KEY, TAG_KEY
from nativert.call_delegate import call_delegate
from nativert.delegate import Delegate, default_delegates, get_delegate, require_available
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.settings import OpLike, Settings


def op_name(target: Any) -> str:
    """'aten.relu.default' style name of a node target, for messages and reports."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def _matches(node: Node, keys: Iterable[str]) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.name() in keys or target._schema.name in keys


def produces_tensors(node: Node) -> bool:
    """Whether `node` yields tensors (one, or a non-empty tuple of them): what a delegate can
    return."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


class _AssignedTo(OperatorSupportBase):
    def __init__(self, assignment: Mapping[Node, str], backend_id: str) -> None:
        self._assignment = assignment
        self._backend_id = backend_id

    def is_node_supported(self, submodules: Mapping[str, torch.nn.Module], node: Node) -> bool:
        return self._assignment.get(node) == self._backend_id


class CapabilityPartitioner:
    """Tag every supported node for the highest-priority delegate that supports it.

    Args:
        delegates: backend ids in priority order; default every available delegate except
            reference ones (eager), which are used only when nothing else is available, and
            opt-in ones (aoti: compiles take seconds), used only when named.
        min_block_size: regions with fewer compute nodes stay in PyTorch.
        exclude_ops: ops ("aten::name" or OpOverload) that always stay in PyTorch.
        allow_single_node_ops: ops whose regions are kept even below min_block_size
            (a region is kept when all its compute nodes are such ops).
        compile_specs: per backend id, a dict of compile options.
    """

    def __init__(
        self,
        delegates: Sequence[str] | None = None,
        *,
        min_block_size: int = 1,
        exclude_ops: Iterable[OpLike] = (),
        allow_single_node_ops: Iterable[OpLike] = (),
        compile_specs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.settings = Settings(
            delegates=delegates,
            min_block_size=min_block_size,
            exclude_ops=exclude_ops,
            allow_single_node_ops=allow_single_node_ops,
            compile_specs=compile_specs or {},
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> CapabilityPartitioner:
        """The partitioner the settings describe (their partitioning fields, compile specs
        and num_threads; the others are not its business)."""
        partitioner = cls.__new__(cls)
        partitioner.settings = settings
        return partitioner

    @property
    def delegates(self) -> tuple[str, ...] | None:
        return self.settings.delegates

    def candidates(self) -> list[Delegate]:
        """The delegates it assigns nodes to, in priority order."""
        if self.settings.delegates is None:
            return default_delegates()
        chosen = [get_delegate(b) for b in self.settings.delegates]
        for delegate in chosen:
            require_available(delegate)
        return chosen

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]:
        ops: frozenset = frozenset()
        for delegate in self.candidates():
            ops |= delegate.ops_to_preserve()
        return ops

    def _assign(
        self, node: Node, delegates: list[Delegate], assignment: dict[Node, str]
    ) -> str | None:
        """Backend id for `node`, or None with the reason recorded in node.meta."""
        if node.target is call_delegate:
            return None  # already delegated: not a candidate, and not "kept in PyTorch"
        if node.target is operator.getitem:
            producer = node.args[0]
            if isinstance(producer, Node) and producer in assignment:
                return assignment[producer]
            if isinstance(producer, Node) and producer.target is call_delegate:
                return None
            node.meta[REASON_KEY] = "reads an output of a node kept in PyTorch"
            return None
        if node.meta.get(PIN_KEY):
            node.meta[REASON_KEY] = node.meta[PIN_KEY]
            return None
        if _matches(node, self.settings.exclude_ops):
            node.meta[REASON_KEY] = "excluded by user"
            return None
        if not produces_tensors(node):
            node.meta[REASON_KEY] = (
                "returns no tensor (checks and effects stay in PyTorch)"
                if node.meta.get("val") is None
                else "produces a Python scalar (shape arithmetic stays in PyTorch)"
            )
            return None
        reasons = []
        for delegate in delegates:
            reason = delegate.check_support(node)
            if reason is None:
                return delegate.backend_id
            reasons.append(f"{delegate.backend_id}: {reason}")
        node.meta[REASON_KEY] = (
            "; ".join(reasons) if reasons else f"no delegate supports {op_name(node.target)}"
        )
        return None

    def partition(self, program: ExportedProgram) -> PartitionResult:
        gm = program.graph_module
        delegates = self.candidates()
        kinds = {spec.arg.name: spec.kind for spec in program.graph_signature.input_specs}
        assignment: dict[Node, str] = {}
        for node in gm.graph.nodes:
            node.meta.pop(TAG_KEY, None)
            node.meta.pop(REASON_KEY, None)
            if node.op == "placeholder":
                node.meta[INPUT_KIND_KEY] = kinds.get(node.name)
            elif node.op == "call_function":
                backend_id = self._assign(node, delegates, assignment)
                if backend_id is not None:
                    assignment[node] = backend_id

        regions: list[tuple[str, list[Node]]] = []
        for delegate in delegates:
            backend_id = delegate.backend_id
            if backend_id not in assignment.values():
                continue
            proposer = CapabilityBasedPartitioner(
                gm, _AssignedTo(assignment, backend_id), allows_single_node_partition=True
            )
            for partition in proposer.propose_partitions():
                nodes = list(partition.nodes)
                if self._big_enough(nodes):
                    regions.append((backend_id, nodes))
                else:
                    reason = (
                        f"region below min_block_size={self.settings.min_block_size}"
                        if any(is_compute(n) for n in nodes)
                        # The partitioner merges views into any region they can join; these
                        # sit between PyTorch nodes, or joining would close a cycle.
                        else "only views here: no region they can join (their neighbours "
                        "stay in PyTorch, or joining would form a cycle)"
                    )
                    for node in nodes:
                        node.meta[REASON_KEY] = reason

        specs = {d.backend_id: self.settings.specs_for(d) for d in delegates}
        tags: dict[str, DelegationSpec] = {}
        for backend_id, nodes in _break_cycles(gm, regions):
            tag = f"{backend_id}_{len(tags)}"
            for node in nodes:
                node.meta[TAG_KEY] = tag
            tags[tag] = DelegationSpec(backend_id, specs[backend_id])
        return PartitionResult(program, tags)

    def _big_enough(self, nodes: list[Node]) -> bool:
        compute = [n for n in nodes if is_compute(n)]
        if len(compute) >= self.settings.min_block_size:
            return True
        allowed = self.settings.allow_single_node_ops
        return bool(compute) and all(_matches(n, allowed) for n in compute)


def is_compute(node: Node) -> bool:
    """Counts toward min_block_size: not a getitem and not a view."""
    if node.target is operator.getitem:
        return False
    return not (isinstance(node.target, torch._ops.OpOverload) and node.target.is_view)


def _regions_on_cycles(
    gm: torch.fx.GraphModule, regions: list[tuple[str, list[Node]]]
) -> list[int]:
    """Indices of regions on a cycle once each region is contracted to one vertex (Kahn)."""
    owner = {node: i for i, (_, nodes) in enumerate(regions) for node in nodes}
    edges: dict[Any, set[Any]] = {}
    indegree: dict[Any, int] = {}
    for node in gm.graph.nodes:
        src = ("region", owner[node]) if node in owner else node
        edges.setdefault(src, set())
        indegree.setdefault(src, 0)
        for user in node.users:
            dst = ("region", owner[user]) if user in owner else user
            if dst != src and dst not in edges[src]:
                edges[src].add(dst)
                indegree[dst] = indegree.get(dst, 0) + 1
    ready = [v for v, d in indegree.items() if d == 0]
    while ready:
        for w in edges[ready.pop()]:
            indegree[w] -= 1
            if indegree[w] == 0:
                ready.append(w)
    return [v[1] for v, d in indegree.items() if d > 0 and isinstance(v, tuple)]


def _break_cycles(
    gm: torch.fx.GraphModule, regions: list[tuple[str, list[Node]]]
) -> list[tuple[str, list[Node]]]:
    """Drop regions until fusing every remaining region yields an acyclic graph.

    Regions left over by a topological sort of the contracted graph sit on a cycle; the
    smallest of them goes back to PyTorch (with the reason recorded), and we try again.
    """
    regions = list(regions)
    while stuck := _regions_on_cycles(gm, regions):
        victim = min(stuck, key=lambda i: (len(regions[i][1]), -i))
        backend_id, nodes = regions[victim]
        others = sorted({regions[i][0] for i in stuck if i != victim})
        for node in nodes:
            node.meta[REASON_KEY] = (
                f"its {backend_id} region would form a cycle with regions of "
                f"{', '.join(others)}; kept in PyTorch"
            )
        del regions[victim]
    return regions


class AllNodePartitioner(CapabilityPartitioner):
    """Everything `backend_id` supports, to that one delegate."""

    def __init__(self, backend_id: str, *, compile_specs: Mapping[str, Any] | None = None) -> None:
        super().__init__([backend_id], compile_specs={backend_id: dict(compile_specs or {})})

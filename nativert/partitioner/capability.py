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
from nativert._program.ops import is_compute, op_name, produces_tensors
from nativert._program.quant import INT8, is_quantized, quantized_units
from nativert.call_delegate import call_delegate
from nativert.delegate import Delegate, default_delegates, get_delegate, require_available
from nativert.partitioner.base import DelegationSpec, PartitionResult
from nativert.settings import OpLike, Settings


def _matches(node: Node, keys: Iterable[str]) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return target.name() in keys or target._schema.name in keys


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
            return default_delegates(self.settings.precision)
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

        units = quantized_units(gm.graph)
        for unit in units:
            self._assign_unit(unit, delegates, assignment)
        while True:
            regions = self._regions(gm, delegates, assignment)
            owner = {node: i for i, (_, nodes) in enumerate(regions) for node in nodes}
            split = [u for u in units if len({owner.get(n) for n in u}) > 1]
            if not split:
                break
            # A region boundary inside a quantized unit would cut an op from its Q/DQ (its
            # int8 kernel): such a unit stays in PyTorch whole, and the regions are redrawn.
            for unit in split:
                for node in unit:
                    assignment.pop(node, None)
                    node.meta[REASON_KEY] = (
                        f"its quantized unit ({_unit_text(unit)}) would be split between "
                        "regions; kept in PyTorch whole"
                    )

        specs = {d.backend_id: self.settings.specs_for(d) for d in delegates}
        int8 = {d.backend_id: self.settings.specs_for(d, INT8) for d in delegates}
        tags: dict[str, DelegationSpec] = {}
        for backend_id, nodes in regions:
            tag = f"{backend_id}_{len(tags)}"
            for node in nodes:
                node.meta[TAG_KEY] = tag
            chosen = int8 if is_quantized(nodes) else specs
            tags[tag] = DelegationSpec(backend_id, chosen[backend_id])
        return PartitionResult(program, tags)

    def _assign_unit(
        self, unit: list[Node], delegates: list[Delegate], assignment: dict[Node, str]
    ) -> None:
        """Give every node of a quantized unit the first delegate that runs all of it, or
        keep the whole unit in PyTorch (with each node's reason saying why)."""
        checked = [n for n in unit if n.target is not operator.getitem]
        kept = next((n for n in checked if n not in assignment), None)
        if kept is None:
            reasons = []
            for delegate in delegates:
                refused = [(n, delegate.check_support(n)) for n in checked]
                refused = [(n, why) for n, why in refused if why is not None]
                if not refused:
                    for node in unit:
                        assignment[node] = delegate.backend_id
                    return
                node, why = refused[0]
                reasons.append(f"{delegate.backend_id}: {node.name}: {why}")
            why = "; ".join(reasons)
        else:
            why = f"{kept.name} stays in PyTorch ({kept.meta.get(REASON_KEY)})"
        for node in unit:
            assignment.pop(node, None)
            if node is not kept:  # that one keeps its own reason
                node.meta[REASON_KEY] = (
                    f"its quantized unit ({_unit_text(unit)}) runs whole or not at all: {why}"
                )

    def _regions(
        self, gm: torch.fx.GraphModule, delegates: list[Delegate], assignment: dict[Node, str]
    ) -> list[tuple[str, list[Node]]]:
        """The regions the assignment makes: grown per delegate, small ones dropped, cycles
        broken. Nodes of dropped regions record why."""
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
        return _break_cycles(gm, regions)

    def _big_enough(self, nodes: list[Node]) -> bool:
        compute = [n for n in nodes if is_compute(n)]
        if len(compute) >= self.settings.min_block_size:
            return True
        allowed = self.settings.allow_single_node_ops
        return bool(compute) and all(_matches(n, allowed) for n in compute)


def _unit_text(unit: list[Node], most: int = 4) -> str:
    names = [n.name for n in unit]
    return ", ".join(names[:most]) + (f", ... {len(names)} nodes" if len(names) > most else "")


def _regions_on_cycles(
    gm: torch.fx.GraphModule, regions: list[tuple[str, list[Node]]]
) -> list[list[int]]:
    """The cycles the regions would form once each is contracted to one vertex: for every
    strongly connected component of the contracted graph that holds more than one vertex,
    the indices of its regions. Regions merely downstream (or upstream) of a cycle are in
    no such component: they are not on it."""
    owner = {node: i for i, (_, nodes) in enumerate(regions) for node in nodes}

    def vertex(node: Node) -> Any:
        return ("region", owner[node]) if node in owner else node

    successors: dict[Any, dict[Any, None]] = {}  # insertion-ordered sets
    for node in gm.graph.nodes:
        src = vertex(node)
        targets = successors.setdefault(src, {})
        for user in node.users:
            dst = vertex(user)
            if dst != src:
                targets[dst] = None
    edges = {v: list(targets) for v, targets in successors.items()}
    cycles = []
    for component in _strongly_connected(edges):
        on_cycle = sorted(v[1] for v in component if isinstance(v, tuple))
        if len(component) > 1 and on_cycle:
            cycles.append(on_cycle)
    return cycles


def _strongly_connected(edges: dict[Any, list[Any]]) -> list[list[Any]]:
    """Tarjan's strongly connected components, iteratively (graphs have 10^5 nodes)."""
    index: dict[Any, int] = {}
    low: dict[Any, int] = {}
    stack: list[Any] = []
    on_stack: set[Any] = set()
    components = []
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            successors = edges.get(v, ())
            if i < len(successors):
                work.append((v, i + 1))
                w = successors[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                components.append(component)
            if work:  # v is done: its caller takes its low link
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return components


def _break_cycles(
    gm: torch.fx.GraphModule, regions: list[tuple[str, list[Node]]]
) -> list[tuple[str, list[Node]]]:
    """Drop regions until fusing every remaining region yields an acyclic graph.

    The smallest region on a cycle goes back to PyTorch (with the reason recorded, naming
    the delegates of the other regions on that cycle), and we look again.
    """
    regions = list(regions)
    while cycles := _regions_on_cycles(gm, regions):
        stuck = cycles[0]
        victim = min(stuck, key=lambda i: (len(regions[i][1]), -i))
        backend_id, nodes = regions[victim]
        others = sorted({regions[i][0] for i in stuck if i != victim})
        reason = (
            f"its {backend_id} region would form a cycle with regions of {', '.join(others)}"
            if others
            else f"its {backend_id} region would feed itself through nodes kept in PyTorch"
        )
        for node in nodes:
            node.meta[REASON_KEY] = reason + "; kept in PyTorch"
        del regions[victim]
    return regions


class AllNodePartitioner(CapabilityPartitioner):
    """Everything `backend_id` supports, to that one delegate."""

    def __init__(self, backend_id: str, *, compile_specs: Mapping[str, Any] | None = None) -> None:
        super().__init__([backend_id], compile_specs={backend_id: dict(compile_specs or {})})

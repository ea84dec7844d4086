"""The delegation report: what runs where, and why the rest stays in PyTorch.

Built from a lowered program alone: delegated nodes are read from each lowered module's
reference program, the rest from the top-level graph, with the reasons the partitioner left in
node.meta. Counts add up to the nodes of the program before lowering, with one rule
everywhere (lowering, `nativert inspect`, a loaded package): every call_function node except
`getitem`s, which only pick one output of a multi-output op (and which a package's graphs
may spell differently).
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from typing import Any

from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program.accuracy import Accuracy
from nativert._program.meta import NOTE_KEY, SOURCE_OP_KEY
from nativert._program.ops import op_name
from nativert.call_delegate import call_delegate, delegate_nodes
from nativert.partitioner.base import REASON_KEY

PYTORCH = "pytorch"
NO_REASON = "no reason recorded (not partitioned by nativert, or loaded without metadata)"


@dataclasses.dataclass(frozen=True)
class Region:
    name: str
    backend_id: str
    num_nodes: int
    tuning: str = ""  # what autotune or the accuracy guard measured for it
    precision: str = "fp32"  # what its delegate computes in
    accuracy: list | None = None  # [max_abs, max_rel, sqnr_db] against fp32, when below it

    def precision_text(self) -> str:
        if self.precision == "fp32" or self.accuracy is None:
            return self.precision
        return f"{self.precision} ({Accuracy.from_json(self.accuracy).text()})"


@dataclasses.dataclass(frozen=True)
class DelegationReport:
    """`ops[op][runner]` counts nodes per op, where runner is a backend id or "pytorch"."""

    regions: tuple[Region, ...]
    ops: dict[str, dict[str, int]]
    reasons: dict[str, dict[str, int]]

    @property
    def total_nodes(self) -> int:
        return sum(sum(by.values()) for by in self.ops.values())

    @property
    def delegated_nodes(self) -> int:
        return sum(n for by in self.ops.values() for who, n in by.items() if who != PYTORCH)

    def per_delegate(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for by in self.ops.values():
            totals.update(by)
        return dict(totals)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_nodes": self.total_nodes,
            "delegated_nodes": self.delegated_nodes,
            "per_delegate": self.per_delegate(),
            "regions": [dataclasses.asdict(r) for r in self.regions],
            "ops": self.ops,
            "reasons": self.reasons,
            "headline": self.headline,
        }

    def by_reason(self) -> dict[str, dict[str, int]]:
        """`reasons` turned around: per reason, the ops it kept in PyTorch and how many."""
        grouped: dict[str, dict[str, int]] = {}
        for op, by in self.reasons.items():
            for reason, n in by.items():
                grouped.setdefault(reason, {})[op] = n
        return grouped

    @property
    def headline(self) -> str | None:
        """One line when less than 90% is delegated: the share, and the reason that kept the
        most nodes in PyTorch."""
        total, delegated = self.total_nodes, self.delegated_nodes
        if not total or delegated >= 0.9 * total:
            return None
        kept = total - delegated
        counts = {reason: sum(ops.values()) for reason, ops in self.by_reason().items()}
        share = f"only {100 * delegated / total:.0f}% delegated"
        if not counts:
            return share
        reason, n = max(counts.items(), key=lambda item: item[1])
        return f"{share}; {n} of the {kept} nodes in PyTorch: {reason}"

    def __str__(self) -> str:
        total, delegated = self.total_nodes, self.delegated_nodes
        share = f"{100 * delegated / total:.0f}%" if total else "n/a"
        lines = [
            f"Delegation report: {delegated} of {total} nodes delegated ({share}) "
            f"in {len(self.regions)} region(s)"
        ]
        if self.headline:
            lines.append(f"  ! {self.headline}")
        for region in self.regions:
            lines.append(
                f"  {region.name:<24} {region.backend_id:<14} {region.num_nodes:>4} nodes  "
                f"{region.precision_text()}"
            )
            if region.tuning:
                lines.append(f"    {region.tuning}")
        runners = sorted({who for by in self.ops.values() for who in by} - {PYTORCH}) + [PYTORCH]
        width = max([len("op"), *(len(op) for op in self.ops)])
        lines.append("  " + "op".ljust(width) + "".join(f"{r:>12}" for r in runners))
        for op in sorted(self.ops):
            counts = "".join(f"{self.ops[op].get(r, 0):>12}" for r in runners)
            lines.append(f"  {op.ljust(width)}{counts}")
        if self.reasons:
            lines.append("  kept in PyTorch, and why:")
            for reason, ops in sorted(self.by_reason().items()):
                counted = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items()))
                lines.append(f"    {counted}: {reason}")
        return "\n".join(lines)


def _is_delegate_plumbing(node: Node) -> bool:
    if node.target is call_delegate:
        return True
    source = node.args[0] if node.target is operator.getitem and node.args else None
    return isinstance(source, Node) and source.target is call_delegate


def delegation_report(program: ExportedProgram) -> DelegationReport:
    """Count delegated and non-delegated nodes per op and delegate, with why-not reasons."""
    ops: dict[str, Counter[str]] = {}
    reasons: dict[str, Counter[str]] = {}
    regions = []
    for call in delegate_nodes(program):
        lowered = program.graph_module.get_submodule(call.args[0].target)
        inner = [
            n
            for n in lowered.original_module.graph.nodes
            if n.op == "call_function" and n.target is not operator.getitem
        ]
        tuning = call.meta.get(NOTE_KEY, "")
        accuracy = lowered.accuracy.to_json() if lowered.accuracy is not None else None
        regions.append(
            Region(
                lowered.module_name,
                lowered.backend_id,
                len(inner),
                tuning,
                lowered.precision,
                accuracy,
            )
        )
        for node in inner:
            name = node.meta.get(SOURCE_OP_KEY) or op_name(node.target)
            ops.setdefault(name, Counter())[lowered.backend_id] += 1
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if _is_delegate_plumbing(node):
            continue
        name = op_name(node.target)
        ops.setdefault(name, Counter())[PYTORCH] += 1
        reasons.setdefault(name, Counter())[node.meta.get(REASON_KEY, NO_REASON)] += 1
    return DelegationReport(
        regions=tuple(regions),
        ops={op: dict(by) for op, by in ops.items()},
        reasons={op: dict(by) for op, by in reasons.items()},
    )

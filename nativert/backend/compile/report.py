"""What the torch.compile backend did with each Dynamo graph (`last_compile_report()`)."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from typing import Any

from nativert.settings import Settings


@dataclasses.dataclass
class GraphCompile:
    """One aot_autograd graph (forward, backward or inference) as nativert compiled it."""

    kind: str
    report: Any  # DelegationReport
    program: Any  # the delegated ExportedProgram the Executor runs
    fallbacks: list[str]
    seconds: float
    cache_hits: int
    cache_misses: int


@dataclasses.dataclass
class CompileReport:
    """What the backend did with one Dynamo graph: its aot graphs, fallbacks and cache use.

    The backward graph is compiled when the first backward runs, so it appears then.
    `choice`: which candidate runs the graph, and the times that decided it.
    """

    graph_id: int
    settings: Settings
    graphs: list[GraphCompile] = dataclasses.field(default_factory=list)
    # What runs the graph, measured against PyTorch (choose.py); None when not compared.
    choice: Any = None

    @property
    def runs_on(self) -> str:
        """ "nativert" (the delegated graphs), "pytorch" or "inductor"."""
        return "nativert" if self.choice is None else self.choice.choice

    @property
    def fallbacks(self) -> list[str]:
        return [f for g in self.graphs for f in g.fallbacks]

    @property
    def cache_hits(self) -> int:
        return sum(g.cache_hits for g in self.graphs)

    @property
    def cache_misses(self) -> int:
        return sum(g.cache_misses for g in self.graphs)

    @property
    def seconds(self) -> float:
        return sum(g.seconds for g in self.graphs)

    def __str__(self) -> str:
        lines = [
            f"nativert torch.compile graph {self.graph_id}: {len(self.graphs)} aot graph(s), "
            f"{self.seconds:.2f} s, cache {self.cache_hits} hit(s) / {self.cache_misses} miss(es)"
        ]
        if self.choice is not None:
            lines.append(f"-- {self.choice.line()}")
        for graph in self.graphs:
            lines.append(f"-- {graph.kind} ({graph.seconds:.2f} s)")
            lines.append(str(graph.report))
            lines += [f"  fallback: {f}" for f in graph.fallbacks]
        return "\n".join(lines)


_reports: list[CompileReport] = []
_reports_lock = threading.Lock()
_graph_ids = itertools.count()
_MAX_REPORTS = 64


def last_compile_report() -> CompileReport | None:
    """The report of the Dynamo graph nativert compiled last in this process (None if none)."""
    with _reports_lock:
        return _reports[-1] if _reports else None


def compile_reports() -> list[CompileReport]:
    """Reports of the Dynamo graphs compiled in this process, oldest first (the last 64)."""
    with _reports_lock:
        return list(_reports)


def new_report(settings: Settings) -> CompileReport:
    report = CompileReport(next(_graph_ids), settings)
    with _reports_lock:
        _reports.append(report)
        del _reports[:-_MAX_REPORTS]
    return report

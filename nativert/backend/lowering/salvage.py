"""Salvage: delegate what can be delegated of a region that failed to compile."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping

from torch.fx import Node

from nativert._program.meta import REASON_KEY, TAG_KEY
from nativert._program.ops import is_compute, op_name
from nativert.backend.lowering.compile import compile_segment
from nativert.backend.lowering.hybrid import with_hybrid_specs
from nativert.backend.lowering.segments import fuse_copy
from nativert.delegate import get_delegate
from nativert.errors import DelegateCompileError, first_line


class Salvage:
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
        fused = fuse_copy(self.program, tag, names)
        try:
            lowered = compile_segment(
                fused.segment,
                spec,
                tag,
                mutated_arg_indices=fused.mutated_idx,
                state_arg_indices=fused.state_idx,
                cache=self.cache,
            )
        except DelegateCompileError as exc:
            return None, exc
        return (tag, lowered, fused.arg_names), None

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

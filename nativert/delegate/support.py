"""Support tables: which ops a delegate runs, with optional per-op checkers.

A table maps OpOverload -> checker or None. A checker looks at one node and returns None when
the delegate can run it, or a short reason when it cannot ("dtype bfloat16 not supported").
Checkers compose with `all_of`. They never catch exceptions: a checker that fails is a bug to
see, not a node to silently keep in PyTorch.

Checkers read `node.meta["val"]` (fake tensors) and, for `constant_args`, the input kind that
the partitioner records on placeholders (`node.meta["nativert_input_kind"]`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch.fx import Node

from nativert._program.meta import INPUT_KIND_KEY
from nativert._program.signature import WEIGHT_KINDS

Checker = Callable[[Node], "str | None"]


def _tensors(node: Node) -> list[torch.Tensor]:
    """Fake values of the node's tensor inputs and outputs."""
    values = [a.meta.get("val") for a in node.all_input_nodes]
    out = node.meta.get("val")
    values.extend(out if isinstance(out, (tuple, list)) else [out])
    return [v for v in values if isinstance(v, torch.Tensor)]


def dtypes(*allowed: torch.dtype) -> Checker:
    """Every tensor the node reads or writes has one of `allowed` dtypes."""
    allowed_set = frozenset(allowed)

    def check(node: Node) -> str | None:
        for t in _tensors(node):
            if t.dtype not in allowed_set:
                return f"dtype {str(t.dtype).removeprefix('torch.')} not supported"
        return None

    return check


def max_rank(rank: int) -> Checker:
    """No tensor the node reads or writes has more than `rank` dimensions."""

    def check(node: Node) -> str | None:
        for t in _tensors(node):
            if t.dim() > rank:
                return f"rank {t.dim()} exceeds the supported maximum {rank}"
        return None

    return check


def static_shapes() -> Checker:
    """Every dimension the node reads or writes is a concrete int (no symbolic dims)."""

    def check(node: Node) -> str | None:
        for t in _tensors(node):
            if any(isinstance(d, torch.SymInt) for d in t.shape):
                return "dynamic dimensions not supported"
        return None

    return check


def _is_weight(node: Node) -> bool:
    """A weight placeholder, or a view (permute, view, ...) of one."""
    while (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.is_view
        and isinstance(node.args[0], Node)
    ):
        node = node.args[0]
    return node.meta.get(INPUT_KIND_KEY) in WEIGHT_KINDS


def constant_args(*indices: int) -> Checker:
    """Positional args `indices` are weights (or views of weights), not activations."""

    def check(node: Node) -> str | None:
        for i in indices:
            arg = node.args[i] if i < len(node.args) else None
            if isinstance(arg, Node) and not _is_weight(arg):
                return f"argument {i} ({arg.name}) must be a constant weight"
        return None

    return check


def all_of(*checkers: Checker) -> Checker:
    """Supported only if every checker agrees; the first reason wins."""

    def check(node: Node) -> str | None:
        for checker in checkers:
            reason = checker(node)
            if reason is not None:
                return reason
        return None

    return check


class SupportTable:
    """`{OpOverload: checker or None}` plus a checker applied to every op in the table."""

    def __init__(
        self,
        entries: Mapping[torch._ops.OpOverload, Checker | None],
        *,
        every_op: Checker | None = None,
    ) -> None:
        for op in entries:
            if not isinstance(op, torch._ops.OpOverload):
                raise TypeError(f"support table keys must be OpOverloads, got {op!r}")
        self._entries = dict(entries)
        self._every_op = every_op

    @classmethod
    def of(cls, ops: Iterable[torch._ops.OpOverload], *, every_op: Checker | None = None):
        return cls(dict.fromkeys(ops), every_op=every_op)

    def __contains__(self, op: object) -> bool:
        return op in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ops(self) -> frozenset[torch._ops.OpOverload]:
        return frozenset(self._entries)

    def check(self, node: Node) -> str | None:
        target = node.target
        if target not in self._entries:
            name = target if isinstance(target, torch._ops.OpOverload) else node.name
            return f"{name} is not in the support table"
        for checker in (self._every_op, self._entries[target]):
            if checker is not None:
                reason = checker(node)
                if reason is not None:
                    return reason
        return None

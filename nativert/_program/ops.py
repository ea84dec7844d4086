"""What a node is, as lowering, autotune, reports and partitioners all ask it."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node


def op_name(target: Any) -> str:
    """'aten.relu.default' style name of a node target, for messages and reports."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def produces_tensors(node: Node) -> bool:
    """Whether `node` yields tensors (one, or a non-empty tuple of them): what a delegate can
    return."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return bool(val) and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def is_compute(node: Node) -> bool:
    """Counts toward min_block_size: not a getitem and not a view."""
    if node.target is operator.getitem:
        return False
    return not (isinstance(node.target, torch._ops.OpOverload) and node.target.is_view)

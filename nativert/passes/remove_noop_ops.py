"""Remove ops that return their input unchanged.

Problem: export and decomposition leave clones, aliases, detaches, `_to_copy` to the same
dtype and device, views/reshapes/expands to the same shape, and slices that take everything.
Each is a node a delegate must support and a copy or dispatch at run time.

Also removes `_assert_tensor_metadata` checks (see _METADATA_CHECKS).

Guarantees: a node is replaced by its input only when the values are provably identical
(shapes compared without adding guards) and the node does not feed the program's output
directly (so an output never becomes an alias of an input). Values are unchanged.
"""

from __future__ import annotations

import sys

import torch
from torch.export import ExportedProgram
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from nativert._program import copy_graph_module
from nativert.passes.pass_result import PassResult, rewritten

aten = torch.ops.aten
_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default}
_SAME_SHAPE = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
}


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(
        statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)
    )


def _is_noop(node: Node) -> bool:
    source, out = _val(node.args[0]) if node.args else None, _val(node)
    if source is None or out is None:
        return False
    target = node.target
    if target in _IDENTITY:
        fmt = node.kwargs.get("memory_format")
        return fmt in (None, torch.preserve_format)
    if target is aten._to_copy.default:
        kw = node.kwargs
        return (
            out.dtype == source.dtype
            and out.device == source.device
            and kw.get("layout") in (None, source.layout)
            and kw.get("memory_format") in (None, torch.preserve_format)
        )
    if target in _SAME_SHAPE:
        return _same_shape(source, out)
    if target is aten.slice.Tensor:
        dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1])[:4]
        size = source.shape[dim]
        return (
            start in (None, 0)
            and step == 1
            and (end is None or end == sys.maxsize or statically_known_true(end >= size))
        )
    return False


# Checks export records for `.to(dtype)` calls: that an intermediate has the dtype and device
# its fake value says. A program's types are fixed by its signature (inputs are checked on
# every call), so they check nothing, and each is a PyTorch node between delegate regions.
_METADATA_CHECKS = {aten._assert_tensor_metadata.default}


def remove_noop_ops(program: ExportedProgram) -> PassResult:
    gm = copy_graph_module(program)
    modified = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _METADATA_CHECKS and not node.users:
            gm.graph.erase_node(node)
            modified = True
            continue
        if node.op != "call_function" or not _is_noop(node):
            continue
        if any(user.op == "output" for user in node.users):
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        modified = True
    return rewritten(program, gm, modified)

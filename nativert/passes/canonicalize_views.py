"""Give view chains one canonical form: a single `aten.view` per chain.

Problem: decompositions produce `_unsafe_view`, `reshape` of contiguous tensors, and chains
like view(view(x, a), b). Delegates then need support for several spellings of one thing,
and each link is a dispatch at run time.

Guarantees: `_unsafe_view` becomes `view` (same semantics on functional graphs); `reshape`
of a contiguous tensor becomes `view`; a view whose input is a single-use view of a
contiguous tensor reads that tensor directly. Values are unchanged.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import copy_graph_module
from nativert.passes.pass_result import PassResult, rewritten

aten = torch.ops.aten


def _contiguous(node: object) -> bool:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(val, torch.Tensor) and bool(val.is_contiguous())


def canonicalize_views(program: ExportedProgram) -> PassResult:
    gm = copy_graph_module(program)
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._unsafe_view.default or (
            node.target is aten.reshape.default and _contiguous(node.args[0])
        ):
            node.target = aten.view.default
            modified = True
        if node.target is not aten.view.default:
            continue
        inner = node.args[0]
        if (
            isinstance(inner, Node)
            and inner.target is aten.view.default
            and len(inner.users) == 1
            and _contiguous(inner.args[0])
        ):
            node.args = (inner.args[0], *node.args[1:])
            gm.graph.erase_node(inner)
            modified = True
    return rewritten(program, gm, modified)

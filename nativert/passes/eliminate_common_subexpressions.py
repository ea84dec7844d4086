"""Compute each identical pure expression once.

Problem: decompositions repeat work (the same `permute` of a weight for every use, the same
`sym_size`, a mean computed twice by two decomposed ops). Duplicates cost time and split
delegate regions needlessly.

Guarantees: two call_function nodes are merged only when they call the same op with the same
arguments and the op is pure and not random (ops tagged nondeterministic_seeded, and impure
nodes, are never merged). Values are unchanged.
"""

from __future__ import annotations

from typing import Any

from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import copy_graph_module
from nativert.passes.pass_result import PassResult, is_pure_op, rewritten


def _key(value: Any) -> Any:
    """A hashable stand-in for node arguments (lists become tuples, recursively)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if isinstance(value, float):
        return ("float", value)  # keep 1 and 1.0 apart
    hash(value)  # anything else must be hashable; fail loudly otherwise
    return value


def eliminate_common_subexpressions(program: ExportedProgram) -> PassResult:
    gm = copy_graph_module(program)
    seen: dict[Any, Node] = {}
    modified = False
    for node in list(gm.graph.nodes):
        if not is_pure_op(node):
            continue
        key = (node.target, _key(node.args), _key(node.kwargs))
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        modified = True
    return rewritten(program, gm, modified)

"""Keep in PyTorch the view chains that take a user input to an output.

Problem: aot_autograd (the torch.compile path) rebuilds an output that aliases an input
from that input, with the strides the compiled graph returned (as_strided on the input).
Such an output must be a real view. A delegate returns a contiguous copy, and the rebuilt
alias would read the wrong elements.

Guarantees: only node metadata changes (`PIN_KEY` on each view of such a chain, which the
partitioner honours by keeping the node in PyTorch with that reason); the graph, signature
and values are untouched.
"""

from __future__ import annotations

import operator

from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import copy_graph_module
from nativert._program.meta import PIN_KEY
from nativert.passes.pass_result import PassResult, rewritten

REASON = "a view of an input returned as an output (must alias it)"


def is_view(node: Node) -> bool:
    """An op whose output aliases its first input (per its schema), or a getitem of one."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, Node) and is_view(source)
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def pin_output_views_of_inputs(program: ExportedProgram) -> PassResult:
    gm = copy_graph_module(program)
    modified = False
    for value in gm.graph.output_node().args[0]:
        chain = []
        node = value
        while isinstance(node, Node) and is_view(node):
            chain.append(node)
            node = node.args[0]
        if chain and isinstance(node, Node) and node.op == "placeholder":
            for view in chain:
                view.meta[PIN_KEY] = REASON
            modified = True
    return rewritten(program, gm, modified)

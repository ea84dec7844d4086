"""Remove nodes whose results nobody uses.

Problem: decomposition and other passes leave behind nodes whose outputs are never read
(a batch norm's saved statistics in inference, a replaced subexpression). They cost time in
PyTorch and make delegate regions larger than they need to be.

Guarantees: only side-effect-free nodes are removed (FX's is_impure decides); placeholders,
the output and the signature are untouched; values are unchanged.
"""

from __future__ import annotations

from torch.export import ExportedProgram

from nativert._program import copy_graph_module
from nativert.passes.pass_result import PassResult, rewritten


def eliminate_dead_code(program: ExportedProgram) -> PassResult:
    gm = copy_graph_module(program)
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return rewritten(program, gm, modified=len(gm.graph.nodes) != before)

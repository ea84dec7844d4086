"""`view` -> `reshape` for views left in PyTorch that no output returns.

Problem: aot_autograd's graphs (the torch.compile path) record views that are valid for the
strides PyTorch's kernels produced while tracing. Delegates return contiguous tensors, and
some kernels' real strides differ from their fake ones, so such a view can fail at run time
on a tensor of the right shape.

Guarantees: reshape is the same view where one exists and a copy otherwise; graphs here are
functional, so values are unchanged. Views that an output returns stay views (aliasing is
observable). Runs after lowering, on the top-level graph: delegated views are untouched.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from nativert._program import copy_graph_module
from nativert.passes.pass_result import PassResult, rewritten


def relax_views(program: ExportedProgram) -> PassResult:
    aten = torch.ops.aten
    gm = copy_graph_module(program)
    outputs = set(gm.graph.output_node().args[0])
    modified = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default and node not in outputs:
            node.target = aten.reshape.default
            modified = True
    return rewritten(program, gm, modified)

"""Compute a program in a lower floating-point precision, keeping its boundary's dtypes.

Problem: a delegate with no precision switch of its own (AOTInductor) computes in the dtypes
its graph has. To run a segment in bf16 (or fp16) its float32 values must become bf16
inside while callers keep passing and receiving float32.

Rewrite: every float32 placeholder (weights and inputs) is cast to the lower dtype where it
enters, so every op downstream computes in it (ops promote as torch does: a value the graph
creates in float32 itself, or upcasts explicitly, such as a softmax taken in float32, stays
float32); every output that was float32 is cast back. Weights are cast by graph nodes that
read only the weight, so a runtime that folds constants (AOTInductor's runtime constant
folding) converts them once, and a weight swap converts the new ones.

Guarantees: placeholders, their dtypes and the outputs' dtypes and shapes are unchanged;
values differ only by the rounding of the lower precision (the pipeline's accuracy guard
measures it). Node metadata is recomputed by fake-tensor propagation.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import copy_graph_module
from nativert.passes.pass_result import PassResult, rewritten

_CAST = torch.ops.aten._to_copy.default  # core ATen: every delegate's table has it


def _float32(node: object) -> bool:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def lower_precision(program: ExportedProgram, dtype: torch.dtype) -> PassResult:
    """`program` computing in `dtype` (torch.bfloat16 or torch.float16) inside, with the
    same inputs and outputs; see the module docstring."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"lower_precision takes torch.bfloat16 or torch.float16, got {dtype}")
    gm = copy_graph_module(program)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = graph.output_node()
    was_float32 = [_float32(value) for value in output.args[0]]
    modified = False
    for node in placeholders:
        users = [u for u in node.users if u is not output]  # returned as is: stays fp32
        if not _float32(node) or not users:
            continue
        with graph.inserting_after(placeholders[-1]):
            cast = graph.call_function(_CAST, (node,), {"dtype": dtype})
        for user in users:
            user.replace_input_with(node, cast)
        modified = True
    if not modified:
        return PassResult(program, modified=False)
    _propagate(gm, placeholders)
    outputs = []
    with graph.inserting_before(output):
        for value, float32 in zip(output.args[0], was_float32, strict=True):
            if float32 and not _float32(value):
                value = graph.call_function(_CAST, (value,), {"dtype": torch.float32})
            outputs.append(value)
    output.args = (tuple(outputs),)
    graph.lint()
    _propagate(gm, placeholders)
    return rewritten(program, gm, True)


def _propagate(gm: torch.fx.GraphModule, placeholders: list[Node]) -> None:
    """Recompute every node's meta["val"] from the placeholders' (fake) values."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    values = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode(values)
    gm.recompile()
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)

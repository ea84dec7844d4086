"""Decompose a program to functional core ATen, keeping whole the ops delegates prefer.

Problem: `torch.export.export` gives training IR, where in-place buffer updates (batch-norm
running stats) and composite ops (linear, layer_norm) remain. Partitioning needs functional
nodes: a segment must not mutate state that lives outside it, and support tables are written
against core ATen.

Guarantees: the result is functional (mutations appear as outputs in the graph signature),
verifies, computes the same values, and every op in `preserve` that was in the graph stays
a single node instead of being decomposed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.export import ExportedProgram

from nativert.passes.pass_result import PassResult


def decompose_to_core_aten(
    program: ExportedProgram,
    *,
    preserve: Iterable[torch._ops.OpOverload] = (),
) -> PassResult:
    table = torch.export.default_decompositions()
    for op in preserve:
        table.pop(op, None)
    before = [(n.op, n.target) for n in program.graph.nodes]
    decomposed = program.run_decompositions(table)
    after = [(n.op, n.target) for n in decomposed.graph.nodes]
    return PassResult(decomposed, modified=before != after)

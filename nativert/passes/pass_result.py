"""The result every pass returns."""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node

from nativert._program import rebuild_program


@dataclasses.dataclass(frozen=True)
class PassResult:
    """A pass's output program and whether it changed anything."""

    program: ExportedProgram
    modified: bool


def rewritten(program: ExportedProgram, gm: GraphModule, modified: bool) -> PassResult:
    """The result of a pass that rewrote `gm`, a copy of `program`'s graph module."""
    if not modified:
        return PassResult(program, modified=False)
    gm.recompile()
    return PassResult(rebuild_program(program, gm), modified=True)


def is_pure_op(node: Node) -> bool:
    """A call of an op (or getitem) with no side effects whose result depends only on its
    arguments: never random (ops tagged nondeterministic_seeded) and not impure."""
    if node.op != "call_function" or node.is_impure():
        return False
    target = node.target
    if target is operator.getitem:
        return True
    return (
        isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded not in target.tags
    )

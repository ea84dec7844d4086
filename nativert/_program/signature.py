"""Reading an ExportedProgram's signature: its weights, placeholders and arguments."""

from __future__ import annotations

from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, SymIntArgument, TensorArgument
from torch.fx import Node

from nativert.errors import LoweringError

WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def weight_names(program: ExportedProgram) -> tuple[str, ...]:
    """Targets of the program's lifted weights, in placeholder order (they come first)."""
    names = []
    for spec in program.graph_signature.input_specs:
        if spec.kind in WEIGHT_KINDS:
            names.append(spec.target)
        elif spec.kind != InputKind.USER_INPUT:
            raise LoweringError(
                f"input {spec.arg.name!r} is of kind {spec.kind.name}, which nativert cannot "
                "lower yet (custom objects and effect tokens are not supported)"
            )
    return tuple(names)


def weight_tensor(program: ExportedProgram, target: str) -> torch.Tensor:
    """The tensor a lifted weight target refers to (state_dict or constants)."""
    if target in program.state_dict:
        return program.state_dict[target]
    if target in program.constants:
        return program.constants[target]
    raise LoweringError(f"weight {target!r} is in the signature but not in the program")


def placeholder_values(program: ExportedProgram) -> list[Any]:
    """meta['val'] of every placeholder, in order (fake tensors or SymInts)."""
    return [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]


def finite_int(bound: Any) -> int | None:
    """A range bound as an int; None for an unbounded one (int_oo and friends)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def argument(node: Node) -> TensorArgument | SymIntArgument:
    """The signature argument for a graph node (SymInt placeholders are SymIntArguments)."""
    if isinstance(node.meta.get("val"), torch.SymInt):
        return SymIntArgument(name=node.name)
    return TensorArgument(name=node.name)

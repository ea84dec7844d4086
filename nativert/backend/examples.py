"""Real values for a program's nodes: what autotune times and the accuracy guard compares.

The example inputs the program was exported with (`ExportedProgram.example_inputs`), else
inputs synthesized from the placeholders' shapes (floats random, integers zero so indices
stay in range; symbolic dims at their hints); one run of the program then gives every node's
value, from which each region's arguments are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from nativert._program import WEIGHT_KINDS, weight_tensor
from nativert._program.inputs import InputSpecs
from nativert._program.meta import ARG_NAME_KEY
from nativert.backend.runtime.tokens import new_token
from nativert.errors import DelegateCompileError


def _hint(dim: Any) -> int:
    if isinstance(dim, torch.SymInt):
        hint = dim.node.hint
        return int(hint) if hint is not None else 4
    return int(dim)


def _synthesize(val: Any) -> Any:
    """A real value like `val` (a placeholder's meta value): floats random, others zero (so
    indices stay in range)."""
    if isinstance(val, torch.Tensor):
        shape = [_hint(d) for d in val.shape]
        if val.dtype.is_floating_point or val.dtype.is_complex:
            return torch.randn(shape, dtype=val.dtype, device=val.device)
        return torch.zeros(shape, dtype=val.dtype, device=val.device)
    if isinstance(val, torch.SymInt):
        return _hint(val)
    return val


def example_user_inputs(program: ExportedProgram, example_inputs: Any) -> list[Any]:
    """Flat user inputs: the example inputs given, else synthesized ones."""
    from torch._subclasses.fake_tensor import FakeTensor

    leaves = torch.utils._pytree.tree_leaves(example_inputs)
    if example_inputs is not None and not any(isinstance(v, FakeTensor) for v in leaves):
        args, kwargs = example_inputs
        return list(InputSpecs(program).flatten(tuple(args), dict(kwargs)))
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return [
        _synthesize(placeholders[s.arg.name].meta.get("val"))
        for s in program.graph_signature.input_specs
        if s.kind == InputKind.USER_INPUT
    ]


def node_values(program: ExportedProgram, flat_inputs: Sequence[Any]) -> dict[str, Any]:
    """Run `program` once; every node's value by name (placeholders by signature name)."""
    args, inputs = [], iter(flat_inputs)
    for spec in program.graph_signature.input_specs:
        if spec.kind in WEIGHT_KINDS:
            args.append(weight_tensor(program, spec.target))
        elif spec.kind == InputKind.USER_INPUT:
            args.append(next(inputs))
        elif spec.kind == InputKind.TOKEN:  # effect tokens carry no data: a fresh one
            args.append(new_token())
        else:
            raise DelegateCompileError(f"cannot run example inputs of kind {spec.kind.name}")
    interpreter = torch.fx.Interpreter(program.graph_module, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*args)
    return {n.meta.get(ARG_NAME_KEY, n.name): v for n, v in interpreter.env.items()}


def region_args(values: Mapping[str, Any], arg_names: Sequence[str]) -> list[Any]:
    """A region's arguments (weights first, then inputs) from `node_values`, by the names
    `lowering.region_segments` gives them."""
    return [values[name] for name in arg_names]

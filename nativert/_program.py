"""Small helpers over ExportedProgram signatures and tensors, shared by lowering and runtime."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.multiprocessing.reductions import StorageWeakRef

from nativert.errors import LoweringError, WeightsError

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


def weight_tensors(program: ExportedProgram) -> dict[str, torch.Tensor]:
    return {name: weight_tensor(program, name) for name in weight_names(program)}


def placeholder_values(program: ExportedProgram) -> list[Any]:
    """meta['val'] of every placeholder, in order (fake tensors or SymInts)."""
    return [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"]


def validate_weights(
    expected: Mapping[str, Any],
    given: Mapping[str, torch.Tensor],
    *,
    owner: str,
) -> None:
    """Check names, dtypes and static shapes of `given` against `expected` fake values."""
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{owner}: weights do not match: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}; pass exactly {sorted(expected)}"
        )
    for name, want in expected.items():
        got = given[name]
        if not isinstance(got, torch.Tensor):
            raise WeightsError(
                f"{owner}: weight {name!r} must be a Tensor, got {type(got).__name__}"
            )
        if got.dtype != want.dtype:
            raise WeightsError(
                f"{owner}: weight {name!r} has dtype {got.dtype}, expected {want.dtype}"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise WeightsError(
                f"{owner}: weight {name!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(want.shape)}"
            )


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def unalias_outputs(outputs: Iterable[Any], inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Clone outputs that share storage with an input or an earlier output.

    Callers of call_delegate may rely on outputs being fresh tensors (torch's tracing does),
    while a graph run in PyTorch may return an input, a view of it, or one tensor twice.
    """
    seen = {_storage_key(t) for t in inputs if isinstance(t, torch.Tensor)}
    fresh = []
    for out in outputs:
        if isinstance(out, torch.Tensor):
            key = _storage_key(out)
            if key in seen:
                out = out.clone()
                key = _storage_key(out)
            seen.add(key)
        fresh.append(out)
    return tuple(fresh)


def find_nondifferentiable_outputs(
    program: ExportedProgram, no_grad_inputs: Iterable[int] = ()
) -> frozenset[int]:
    """Indices of outputs that carry no gradient even when every float input requires grad.

    Runs the graph once on the placeholders' fake values; inputs in `no_grad_inputs` (state
    the caller mutates, like running stats) are not made to require grad. Without fake
    values, only non-float outputs are reported.
    """
    values = placeholder_values(program)
    outputs = program.graph.output_node().args[0]
    fallback = frozenset(
        i
        for i, out in enumerate(outputs)
        if not (isinstance(out, torch.fx.Node) and _is_float(out.meta.get("val")))
    )
    fake_mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if fake_mode is None or any(v is None for v in values):
        return fallback
    skip = set(no_grad_inputs)
    with fake_mode, torch.enable_grad():
        args = [
            v.detach().requires_grad_(i not in skip)
            if isinstance(v, torch.Tensor) and _is_float(v)
            else v
            for i, v in enumerate(values)
        ]
        results = program.graph_module(*args)
    return frozenset(
        i
        for i, out in enumerate(results)
        if not (isinstance(out, torch.Tensor) and out.requires_grad)
    )


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())

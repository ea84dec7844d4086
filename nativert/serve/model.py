"""What a server needs to know about a package: its inputs by name, whether requests can be
batched along dim 0, its metadata, and how tensors travel over HTTP (JSON or safetensors).

Nothing here imports Ray: it is plain code over a loaded program, tested on its own."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from nativert._program import finite_int
from nativert._program.inputs import InputSpecs
from nativert.errors import NativertError

DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint8", "bool",
    )
}  # fmt: skip


class RequestError(NativertError):
    """A request that does not fit the package: answered with HTTP 400, naming the input."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One request's answer: its outputs (the program's structure), the version of the weights
    that computed them, the replica, and how many requests ran in the same call."""

    outputs: Any
    weights_version: int
    replica: str
    batch_size: int


@dataclasses.dataclass(frozen=True)
class Batching:
    """Whether requests can be concatenated along dim 0 (every input and output has the same
    dynamic dim 0), and the most rows one call may take (the dim's exported upper bound)."""

    enabled: bool
    reason: str
    max_rows: int | None = None


def _shape(value: Any, names: Mapping[str, str]) -> list:
    return [
        names.get(str(d.node.expr), str(d.node.expr)) if isinstance(d, torch.SymInt) else int(d)
        for d in value.shape
    ]


class PackageModel:
    """The serving view of a loaded program: input names and specs, batching, metadata."""

    def __init__(self, program: ExportedProgram, dim_names: Mapping[str, str] | None = None):
        self.program = program
        self.specs = InputSpecs(program)
        self.input_names = list(self.specs.names)
        self.in_spec = program.call_spec.in_spec
        names = dict(dim_names or {})
        user_outputs = set(program.graph_signature.user_outputs)
        out_nodes = [
            n
            for n in program.graph.output_node().args[0]
            if getattr(n, "name", None) in user_outputs
        ]
        out_values = [n.meta.get("val") for n in out_nodes]
        self.batching = self._batching(self.specs.values, out_values, program)
        self.inputs = [
            {"name": name, "dtype": str(v.dtype).removeprefix("torch."), "shape": _shape(v, names)}
            if isinstance(v, torch.Tensor)
            else {"name": name, "type": type(v).__name__}
            for name, v in zip(self.input_names, self.specs.values, strict=True)
        ]
        self.outputs = [
            {"dtype": str(v.dtype).removeprefix("torch."), "shape": _shape(v, names)}
            if isinstance(v, torch.Tensor)
            else {"type": type(v).__name__}
            for v in out_values
        ]

    @staticmethod
    def _batching(inputs: Sequence[Any], outputs: Sequence[Any], program) -> Batching:
        if not inputs or not all(isinstance(v, torch.Tensor) and v.dim() for v in inputs):
            return Batching(False, "an input is not a tensor with a dim 0")
        first = inputs[0].shape[0]
        if not isinstance(first, torch.SymInt):
            return Batching(False, "dim 0 is static (export with a dynamic batch dim)")
        expr = first.node.expr
        for v in [*inputs, *outputs]:
            if not (
                isinstance(v, torch.Tensor)
                and v.dim()
                and isinstance(v.shape[0], torch.SymInt)
                and v.shape[0].node.expr == expr
            ):
                return Batching(False, "not every input and output has the same dynamic dim 0")
        r = program.range_constraints.get(expr)
        return Batching(True, "dim 0 is dynamic", finite_int(r.upper) if r is not None else None)

    # -- requests --------------------------------------------------------------------------
    def arguments(self, flat: Sequence[Any]) -> tuple[tuple, dict]:
        """The (args, kwargs) to call the program with, from inputs in `input_names` order;
        raises RequestError naming the first input that does not fit."""
        try:
            self.specs.check(list(flat))
        except NativertError as exc:
            raise RequestError(str(exc)) from None
        return pytree.tree_unflatten(list(flat), self.in_spec)

    def decode_json(self, body: bytes) -> list[torch.Tensor]:
        """`{"inputs": {"x": [[...]]}}` or `{"inputs": [...]}`: each tensor a nested list (in
        the input's own dtype) or `{"data": [...], "dtype": "float32", "shape": [...]}`."""
        try:
            request = json.loads(body)
        except ValueError as exc:
            raise RequestError(f"the body is not JSON: {exc}") from None
        given = request.get("inputs") if isinstance(request, dict) else None
        if isinstance(given, list):
            if len(given) != len(self.input_names):
                raise RequestError(
                    f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                    f"got {len(given)}"
                )
            given = dict(zip(self.input_names, given, strict=True))
        if not isinstance(given, dict):
            raise RequestError('expected {"inputs": {name: tensor, ...}} or {"inputs": [...]}')
        return self._by_name(given, self._json_tensor)

    def decode_safetensors(self, body: bytes) -> list[torch.Tensor]:
        """A safetensors file whose tensors are named by input."""
        from safetensors.torch import load

        try:
            tensors = load(body)
        except Exception as exc:  # safetensors raises its own error types for bad bytes
            raise RequestError(f"the body is not a safetensors file: {exc}") from None
        return self._by_name(tensors, lambda name, t: t)

    def _by_name(self, given: Mapping[str, Any], convert) -> list[torch.Tensor]:
        unknown = sorted(set(given) - set(self.input_names))
        missing = [n for n in self.input_names if n not in given]
        if unknown or missing:
            raise RequestError(
                f"inputs: missing {missing or 'none'}, unknown {unknown or 'none'}; this "
                f"package takes {', '.join(self.input_names)}"
            )
        return [convert(name, given[name]) for name in self.input_names]

    def _json_tensor(self, name: str, item: Any) -> torch.Tensor:
        want = self.specs.values[self.input_names.index(name)]
        dtype_name = None
        shape = None
        data = item
        if isinstance(item, dict):
            data, dtype_name, shape = item.get("data"), item.get("dtype"), item.get("shape")
        if dtype_name is None:
            dtype = want.dtype if isinstance(want, torch.Tensor) else torch.float32
        elif dtype_name in DTYPES:
            dtype = DTYPES[dtype_name]
        else:
            raise RequestError(
                f"input {name!r}: unknown dtype {dtype_name!r}; use one of {', '.join(DTYPES)}"
            )
        try:
            tensor = torch.tensor(data, dtype=dtype)
            if shape is not None:
                tensor = tensor.reshape(shape)
        except (TypeError, ValueError, RuntimeError) as exc:
            what = str(dtype).removeprefix("torch.")
            raise RequestError(f"input {name!r}: not a tensor of {what}: {exc}") from None
        return tensor

    # -- responses -------------------------------------------------------------------------
    @staticmethod
    def named_outputs(outputs: Any) -> dict[str, torch.Tensor]:
        """Each output tensor by its path in the program's output (`output` for a single one)."""
        leaves = pytree.tree_flatten_with_path(outputs)[0]
        return {pytree.keystr(path) or "output": leaf for path, leaf in leaves}

    def metadata(self) -> dict:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "batching": {"possible": self.batching.enabled, "reason": self.batching.reason},
        }


def tensor_json(t: torch.Tensor) -> dict:
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "data": t.tolist(),
    }


def split_batch(outputs: Any, sizes: Sequence[int]) -> list[Any]:
    """A batched call's outputs, split back into one output structure per request."""
    leaves, spec = pytree.tree_flatten(outputs)
    parts = [leaf.split(list(sizes)) for leaf in leaves]
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(len(sizes))]

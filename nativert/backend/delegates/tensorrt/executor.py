"""The tensorrt delegate's compile step (engine building) and executor (engine running).

Compile: `torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine` turns the
segment's ExportedProgram into one serialized engine (the payload). Dynamic dims become
min/opt/max profiles from the segment's range constraints.

Run: the engine is deserialized with TensorRT's runtime; each thread gets its own execution
context; inputs and outputs are bound by pointer and run on torch's current CUDA stream.

Weights: the engine has the segment's weights built in. `process_weights` with the weights
it was built with costs nothing; other weights rebuild the engine from the reference program
(seconds), staged and committed like every delegate's.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert._program import (
    finite_int,
    placeholder_values,
    rebuild_program,
    validate_weights,
    weight_names,
)
from nativert.delegate import FP32, PRECISION_SPEC, TORCH_DTYPES, CompileSpec, StagedWeights
from nativert.errors import DelegateCallError, DelegateCompileError

_TRT_TO_TORCH = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "INT8": torch.int8,
    "BOOL": torch.bool,
}
_MAX_DYNAMIC = 4096  # upper bound of a profile for dims the program leaves unbounded


def _input_specs(program: ExportedProgram) -> list[Any]:
    """torch_tensorrt.Input per user input: static shapes, or min/opt/max for dynamic dims."""
    import torch_tensorrt

    count = len(weight_names(program))
    specs = []
    for value in placeholder_values(program)[count:]:
        if not isinstance(value, torch.Tensor):
            raise DelegateCompileError("tensorrt: segments take tensors only (no SymInt inputs)")
        low, opt, high = [], [], []
        for dim in value.shape:
            if isinstance(dim, torch.SymInt):
                ranges = program.range_constraints.get(dim.node.expr)
                lower = max(1, finite_int(ranges.lower) or 1) if ranges is not None else 1
                upper = finite_int(ranges.upper) if ranges is not None else None
                upper = min(upper, _MAX_DYNAMIC) if upper is not None else _MAX_DYNAMIC
                hint = dim.node.hint if dim.node.hint is not None else lower
                low.append(lower)
                opt.append(min(max(int(hint), lower), upper))
                high.append(upper)
            else:
                low.append(int(dim))
                opt.append(int(dim))
                high.append(int(dim))
        if low == high:
            specs.append(torch_tensorrt.Input(shape=low, dtype=value.dtype))
        else:
            specs.append(
                torch_tensorrt.Input(
                    min_shape=low, opt_shape=opt, max_shape=high, dtype=value.dtype
                )
            )
    return specs


def build_engine(program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
    import torch_tensorrt

    settings = {spec.key: spec.value for spec in compile_specs}
    precision = settings.pop(PRECISION_SPEC, FP32)
    if precision != FP32 and "enabled_precisions" not in settings:
        # TensorRT's own typing: it may pick fp16/bf16 kernels per layer, I/O keep dtypes.
        settings["enabled_precisions"] = ["float32", str(TORCH_DTYPES[precision])[6:]]
    if "enabled_precisions" in settings:  # JSON-friendly spelling: ["float16", ...]
        settings["enabled_precisions"] = {
            getattr(torch, p) if isinstance(p, str) else p for p in settings["enabled_precisions"]
        }
    try:
        engine = torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=_input_specs(program), **settings
        )
    except DelegateCompileError:
        raise
    except Exception as exc:
        raise DelegateCompileError(
            f"torch_tensorrt could not build an engine: {type(exc).__name__}: {exc}"
        ) from exc
    return bytes(engine)


class _Engine:
    """A deserialized engine, its I/O names and one execution context per thread."""

    def __init__(self, serialized: bytes) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise DelegateCompileError("tensorrt: the payload is not an engine this TensorRT reads")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.inputs = [n for n, i in zip(names, is_input, strict=True) if i]
        self.outputs = [n for n, i in zip(names, is_input, strict=True) if not i]
        self.output_dtypes = [
            _TRT_TO_TORCH[self.engine.get_tensor_dtype(n).name] for n in self.outputs
        ]
        self.local = threading.local()

    def context(self) -> Any:
        context = getattr(self.local, "context", None)
        if context is None:
            context = self.local.context = self.engine.create_execution_context()
        return context


class TensorRtExecutor(StagedWeights):
    def __init__(
        self, payload: bytes, compile_specs: Sequence[CompileSpec], reference: ExportedProgram
    ) -> None:
        self._name = "tensorrt"
        self._payload = payload
        self._specs = list(compile_specs)
        self._reference = reference
        self.weight_names = weight_names(reference)
        values = placeholder_values(reference)
        self._expected = dict(zip(self.weight_names, values[: len(self.weight_names)], strict=True))
        self._built_with = {n: reference.state_dict.get(n) for n in self.weight_names}
        self._init_state(active=None if self.weight_names else _Engine(payload))

    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        validate_weights(self._expected, weights, owner="delegate 'tensorrt'")
        same = all(
            self._built_with[n] is not None
            and weights[n].device == self._built_with[n].device
            and torch.equal(weights[n], self._built_with[n])
            for n in self.weight_names
        )
        if same:
            self._stage(_Engine(self._payload))
            return
        # The reference with these weights: the engine has them built in.
        reference = self._reference
        rebuilt = rebuild_program(reference, reference.graph_module, new_weights=weights)
        self._stage(_Engine(build_engine(rebuilt, self._specs)))

    def run_with(self, engine: _Engine, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(engine.inputs):
            raise DelegateCallError(
                f"tensorrt delegate takes {len(engine.inputs)} inputs, got {len(inputs)}"
            )
        context = engine.context()
        keep = []
        for name, value in zip(engine.inputs, inputs, strict=True):
            if not isinstance(value, torch.Tensor) or not value.is_cuda:
                raise DelegateCallError(
                    f"tensorrt delegate input {name!r} must be a CUDA tensor, got "
                    f"{getattr(value, 'device', type(value).__name__)}"
                )
            value = value.contiguous()
            keep.append(value)
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, value.data_ptr())
        device = keep[0].device if keep else torch.device("cuda")
        outputs = []
        for name, dtype in zip(engine.outputs, engine.output_dtypes, strict=True):
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=device)
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise DelegateCallError("tensorrt: execute_async_v3 failed (see TensorRT's log)")
        return tuple(outputs)

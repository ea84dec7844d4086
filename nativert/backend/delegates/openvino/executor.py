"""The openvino delegate's executor: one payload, compiled for OpenVINO's CPU plugin.

Weights: the payload's IR has the segment's weights as Parameters. Every build reads the IR,
replaces those Parameters with Constants over the given torch tensors (shared memory, not
copied: the tensors are kept alive as long as the compiled model) and compiles, so OpenVINO
folds and pre-packs them as it would embedded weights. `process_weights` validates, then
builds and stages a new compiled model; `commit_weights` switches atomically (StagedWeights);
calls in flight finish on the compiled model they started with.

Compile settings: the inference precision the `precision` compile spec names, float32 by
default (no bf16/f16 downcast where the CPU has it, so results match eager; bf16 makes the
CPU plugin convert the weights once and use its bf16/AMX kernels), the LATENCY hint (one
stream) and the thread count from the compile specs (default: torch's).

Run: one InferRequest per thread per compiled model (a request must not be shared by
concurrent calls). Inputs are bound zero copy (an ov.Tensor over the torch tensor's memory,
re-bound only when the pointer or shape changes). Outputs: the first call with an input
signature learns the output shapes (on a request of its own, its outputs copied out); later
calls allocate new torch tensors of those shapes and hand them to OpenVINO as its output
tensors, so outputs are written in place and never alias inputs, weights or each other.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert._program import placeholder_values, validate_weights, weight_names
from nativert.backend.delegates.openvino.convert import (
    DTYPES,
    THREADS,
    check_int64_weights,
    int64_out_of_range,
    options,
)
from nativert.backend.delegates.openvino.payload import unpack
from nativert.delegate import PRECISION_SPEC, CompileSpec, StagedWeights
from nativert.errors import DelegateCallError, DelegateLoadError, WeightsError


class _Thread(threading.local):
    """Per thread: its InferRequest and what is bound to each of its inputs."""

    request: Any = None
    bound: list | None = None


class _Compiled:
    """A compiled model and the tensors its constants read; replaced whole on new weights."""

    def __init__(self, model: Any, ports: tuple[tuple[int, int], ...], keep_alive: tuple) -> None:
        self.model = model
        self.ports = ports
        self.outputs = len(model.outputs)
        # With an output that is an input passed through (a Result fed by a Parameter in
        # the plugin's graph), the CPU plugin computes garbage into output tensors set by
        # the caller (OpenVINO 2026.4): such models copy OpenVINO's own outputs instead.
        self.set_outputs = not any(
            result.input_value(0).get_node().get_type_name() == "Parameter"
            for result in model.get_runtime_model().get_results()
        )
        self.keep_alive = keep_alive  # the weight tensors the Constants share memory with
        self.local = _Thread()
        self.probe_lock = threading.Lock()
        self.probe: Any = None  # a request that never gets output tensors set

    def slot(self) -> _Thread:
        local = self.local
        if local.request is None:
            local.request = self.model.create_infer_request()
            local.bound = [None] * len(self.ports)
        return local


class OpenVinoExecutor(StagedWeights):
    """Runs one OpenVINO payload; see the module docstring."""

    def __init__(
        self, payload: bytes, compile_specs: Sequence[CompileSpec], reference: ExportedProgram
    ) -> None:
        import numpy
        import openvino as ov

        self._ov = ov
        self._name = "openvino"
        values = options(compile_specs)
        threads = values.get(THREADS) or torch.get_num_threads()
        # int8: its low-precision transformations pick int8 kernels for the quantized
        # patterns (convert.py); the rest computes in f32.
        precision = {
            "fp32": ov.Type.f32,
            "int8": ov.Type.f32,
            "bf16": ov.Type.bf16,
            "fp16": ov.Type.f16,
        }[values.get(PRECISION_SPEC, "fp32")]
        self._config = {
            ov.properties.hint.inference_precision: precision,
            ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
            ov.properties.inference_num_threads: int(threads),
        }
        self.weight_names = weight_names(reference)
        values = placeholder_values(reference)
        count = len(self.weight_names)
        self._expected = dict(zip(self.weight_names, values[:count], strict=True))
        self._input_vals = values[count:]
        # Checked on every call: int64 values beyond int32 (see support.INT64_LIMIT).
        self._int64_inputs = frozenset(
            i
            for i, v in enumerate(self._input_vals)
            if not isinstance(v, torch.Tensor) or v.dtype == torch.int64
        )
        try:
            self._payload = unpack(payload)
        except ValueError as exc:
            raise DelegateLoadError(f"openvino: {exc}") from None
        self._check_payload_fits(reference)
        self._core = ov.Core()
        self._blob = ov.Tensor(numpy.frombuffer(self._payload.bin, dtype=numpy.uint8).copy())
        # Per input signature: [(shape, dtype)] of the outputs; weights never change shapes,
        # so it is shared by every compiled model.
        self._shapes: dict[tuple, list[tuple[tuple[int, ...], torch.dtype]]] = {}
        self._init_state(active=None if self.weight_names else self._build({}))

    def _check_payload_fits(self, reference: ExportedProgram) -> None:
        names = set(self.weight_names)
        wrong = [
            (name, ref)
            for name, role, ref in self._payload.parameters
            if (role == "weight" and ref not in names)
            or (role == "input" and ref >= len(self._input_vals))
        ]
        outputs = len(reference.graph.output_node().args[0])
        if wrong or self._payload.outputs != outputs:
            raise DelegateLoadError(
                f"openvino payload does not fit its segment (inputs {wrong}, "
                f"{self._payload.outputs} outputs for {outputs}); recompile the segment"
            )

    def _build(self, weights: Mapping[str, torch.Tensor]) -> _Compiled:
        ov = self._ov
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = self._core.read_model(self._payload.xml, self._blob)
                parameters = {p.get_friendly_name(): p for p in model.get_parameters()}
                keep = []
                for name, role, target in self._payload.parameters:
                    if role != "weight":
                        continue
                    tensor = weights[target].detach().contiguous()
                    keep.append(tensor)
                    constant = ov.op.Constant(tensor.numpy(), shared_memory=True)
                    parameter = parameters[name]
                    for use in list(parameter.output(0).get_target_inputs()):
                        use.replace_source_output(constant.output(0))
                    model.remove_parameter(parameter)
                model.validate_nodes_and_infer_types()
                compiled = self._core.compile_model(model, "CPU", self._config)
        except Exception as exc:
            raise DelegateLoadError(
                f"openvino cannot compile the segment: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from exc
        # (segment input index, compiled-model input index) for each input the model reads.
        index = {name: k for k, port in enumerate(compiled.inputs) for name in port.get_names()}
        ports = tuple(
            (ref, index[name])
            for name, role, ref in self._payload.parameters
            if role == "input" and name in index
        )
        return _Compiled(compiled, ports, tuple(keep))

    # -- weights ---------------------------------------------------------------------------
    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        validate_weights(self._expected, weights, owner="delegate 'openvino'")
        try:
            check_int64_weights({n: weights[n] for n in self.weight_names})
        except ValueError as exc:
            raise WeightsError(f"delegate 'openvino': {exc}") from None
        self._stage(self._build(weights))

    # -- running ---------------------------------------------------------------------------
    def _check(self, inputs: Sequence[Any]) -> None:
        """Raise naming the first input OpenVINO cannot take (run once per signature)."""
        if len(inputs) != len(self._input_vals):
            raise DelegateCallError(
                f"openvino delegate takes {len(self._input_vals)} inputs, got {len(inputs)}"
            )
        for i, value in enumerate(inputs):
            if not isinstance(value, torch.Tensor):
                wants_tensor = isinstance(self._input_vals[i], torch.Tensor)
                if wants_tensor or not isinstance(value, int):
                    raise DelegateCallError(
                        f"openvino delegate input {i} is a {type(value).__name__}; expected "
                        f"{'a Tensor' if wants_tensor else 'an int'}"
                    )
            elif value.device.type != "cpu":
                raise DelegateCallError(
                    f"openvino delegate input {i} is on {value.device}; this segment runs on "
                    "CPU: move inputs to CPU"
                )
            elif value.dtype not in DTYPES:
                raise DelegateCallError(
                    f"openvino delegate input {i} has dtype {value.dtype}; it takes "
                    f"{[str(d) for d in DTYPES]}"
                )

    @staticmethod
    def _check_int64(inputs: Sequence[Any], i: int) -> None:
        value = inputs[i]
        too_large = (
            int64_out_of_range(value)
            if isinstance(value, torch.Tensor)
            else not -(2**30) < value < 2**30
        )
        if too_large:
            raise DelegateCallError(
                f"openvino delegate input {i} holds int64 values beyond +-2**30, which "
                "OpenVINO's CPU plugin computes as int32; keep this region in PyTorch "
                "(exclude_ops or another delegate)"
            )

    def _tensor(self, value: Any) -> tuple[Any, Any]:
        """(ov.Tensor over the value's memory, the tensor that owns that memory)."""
        if not isinstance(value, torch.Tensor):  # a SymInt computed outside the segment
            value = torch.tensor(value, dtype=torch.int64)
        if value.requires_grad:
            value = value.detach()
        if not value.is_contiguous():
            value = value.contiguous()
        return self._ov.Tensor(value.numpy(), shared_memory=True), value

    def _first_run(self, compiled: _Compiled, key: tuple, inputs: Sequence[Any]) -> tuple:
        """Run on the probe request (OpenVINO allocates the outputs), learn the output
        shapes for this signature, and return copies of the outputs."""
        self._check(inputs)
        with compiled.probe_lock:
            if compiled.probe is None:
                compiled.probe = compiled.model.create_infer_request()
            request = compiled.probe
            owners = []  # a request does not keep the memory it reads alive
            for i, port in compiled.ports:
                if i in self._int64_inputs:
                    self._check_int64(inputs, i)
                tensor, owner = self._tensor(inputs[i])
                owners.append(owner)
                request.set_input_tensor(port, tensor)
            request.infer(share_outputs=True)  # views: no copies of the outputs
            outputs = tuple(
                torch.from_numpy(request.get_output_tensor(k).data).clone()
                for k in range(compiled.outputs)
            )
        self._shapes[key] = [(tuple(o.shape), o.dtype) for o in outputs]
        return outputs

    def run_with(self, compiled: _Compiled, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        key = tuple((v.shape, v.dtype) if isinstance(v, torch.Tensor) else v for v in inputs)
        specs = self._shapes.get(key)
        if specs is None:
            return self._first_run(compiled, key, inputs)
        ov = self._ov
        slot = compiled.slot()
        request, bound = slot.request, slot.bound
        for j, (i, port) in enumerate(compiled.ports):
            value = inputs[i]
            if i in self._int64_inputs:
                self._check_int64(inputs, i)
            if isinstance(value, torch.Tensor):
                if not value.is_cpu:
                    self._check(inputs)  # raises naming the input
                # What was bound is reused only for the same memory seen the same way.
                mark = (
                    (value.data_ptr(), value.shape, value.dtype) if value.is_contiguous() else None
                )
            else:
                mark = value
            held = bound[j]
            if mark is None or held is None or held[0] != mark:
                tensor, owner = self._tensor(value)
                request.set_input_tensor(port, tensor)
                # Holding the owner keeps the bound memory from being freed and reused by
                # another tensor with the same pointer while it is still bound.
                bound[j] = (mark, owner)
        if not compiled.set_outputs:
            request.infer(share_outputs=True)  # views: no copies of the outputs
            return tuple(
                torch.from_numpy(request.get_output_tensor(k).data).clone()
                for k in range(compiled.outputs)
            )
        outputs = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in specs)
        for k, out in enumerate(outputs):
            request.set_output_tensor(k, ov.Tensor(out.numpy(), shared_memory=True))
        request.infer(share_outputs=True)  # views: no copies of the outputs
        return outputs

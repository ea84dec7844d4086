"""The onnxruntime delegate's executor: one payload, run by ONNX Runtime.

One InferenceSession per payload, run with `run_with_iobinding`. Inputs are bound by
pointer (zero copy on CPU; re-bound only when the pointer changes) and outputs are written
into torch tensors that ORT fills in place. Per input signature, a plan is computed once:
validation, output shapes (from the reference graph's symbolic shapes, or a fake run) and an
IOBinding, one per thread so concurrent callers never share one. Each plan keeps the output
buffers it has bound (`OutputBuffer`): a call hands out new tensors over them and reuses them,
with no allocation and no new binding, once the caller has provably dropped every tensor that
could see them; otherwise it allocates fresh ones and binds those. Never numpy on the hot
path, never `run_with_ort_values`.

Weights: the payload's weight initializers are external, and each session is given them when
it is built. A weight that is still the bytes of a loaded package (`nativert.load` maps them;
`nativert._program.mapped`) is read by ONNX Runtime from the package file itself: it maps the
file region, prepacks matrix weights and drops the unpacked pages, so the session holds what a
plain session over an ONNX file with external data holds, and the torch tensor stays unread
page cache. Any other weight goes through `SessionOptions.add_external_initializers`, which
copies it into the session (ONNX Runtime 1.32 does, measured; prepacked copies then replace
it). `process_weights` validates, then builds a staged session from the new tensors;
`commit_weights` switches sessions atomically; calls in flight finish on the session they
started with.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import placeholder_values, validate_weights, weight_names
from nativert._program.mapped import FileRegion, file_region, is_current
from nativert.backend.delegates.onnxruntime.export import (
    DEFAULT_LOG_SEVERITY,
    DEFAULT_SPINNING,
    EXTERNAL_FOLDER,
    LOG_SEVERITY,
    PREPACK,
    SPINNING,
    SPINNING_MODES,
    THREADS,
    external_initializers,
    options,
    reading_files,
)
from nativert.backend.runtime.buffers import OutputBuffer
from nativert.delegate import FP32, INT8, PRECISION_SPEC, CompileSpec, StagedWeights
from nativert.errors import DelegateCallError, DelegateCompileError

_ONNX_TYPES: dict[str, torch.dtype] = {
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(bool)": torch.bool,
    "tensor(uint8)": torch.uint8,
    "tensor(int8)": torch.int8,
}
# ONNX TensorProto element types: what ORT's bindings take without a numpy dtype lookup.
_ELEMENT_TYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 11,
    torch.float16: 10,
    torch.int64: 7,
    torch.int32: 6,
    torch.bool: 9,
    torch.uint8: 2,  # quantized tensors between regions of a PT2E program
    torch.int8: 3,
}


# ORT rejects a null data pointer, which zero-element tensors have; nothing is read or
# written through it for zero elements, so any valid pointer will do.
_NONEMPTY = torch.empty(1)


class _Native:
    """ORT's C++ session and bindings under its Python wrappers, for one session.

    The wrappers' `run_with_iobinding` and `bind_*` re-check WebGPU graph capture and build
    an OrtDevice on every call (0.6 us per run, 2 us per bind, measured on ORT 1.32); for CPU
    tensors bound by pointer none of that applies. `_sess`, `_iobinding` and
    `_get_c_device` are private names of onnxruntime: a test in tests/backend/delegates/
    test_onnxruntime_outputs.py fails loudly when a release renames them.
    """

    def __init__(self, session: Any) -> None:
        import onnxruntime as ort

        self.session = session
        self.run = session._sess.run_with_iobinding  # (binding, run_options)
        self.cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()

    def binding(self) -> tuple[Any, Any]:
        """(wrapper, C++ binding): the wrapper owns the binding, so keep it too."""
        wrapper = self.session.io_binding()
        return wrapper, wrapper._iobinding


class _Plan:
    """Everything a call with one input signature needs, computed once for it (per thread)."""

    __slots__ = ("wrapper", "binding", "tensor_inputs", "outputs", "bound", "buffers", "scalars")

    def __init__(
        self, wrapper: Any, binding: Any, tensor_inputs: tuple, outputs: tuple, scalars: list
    ) -> None:
        self.wrapper = wrapper  # ORT's Python IOBinding: owns `binding`
        self.binding = binding  # its C++ binding
        self.tensor_inputs = tensor_inputs  # ((index, onnx input name, element type), ...)
        self.outputs = outputs  # ((onnx output name, element type, shape, torch dtype), ...)
        self.bound = [None] * len(tensor_inputs)  # data pointers bound last time
        self.buffers: list[OutputBuffer | None] = [None] * len(outputs)  # bound now
        self.scalars = scalars  # tensors holding int inputs (SymInts), bound once


class _Compiled:
    """A session and what running it needs; replaced whole when weights change."""

    def __init__(self, session: Any, keep_alive: tuple = ()) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_meta = [(i.type, i.shape) for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.keep_alive = keep_alive  # tensors backing the external initializers
        self.native = _Native(session)
        # Plans (with their IOBinding and output buffers) per thread: a session runs calls
        # concurrently, but a binding must not be shared between them.
        self.local = threading.local()

    def plans(self) -> dict[tuple, _Plan]:
        plans = getattr(self.local, "plans", None)
        if plans is None:
            plans = self.local.plans = {}
        return plans


class OnnxRuntimeExecutor(StagedWeights):
    """Runs one ONNX payload; see the module docstring."""

    def __init__(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        reference: ExportedProgram,
    ) -> None:
        import onnxruntime as ort

        self._ort = ort
        self._payload = payload
        specs = options(compile_specs)
        self._threads = int(specs.get(THREADS, torch.get_num_threads()))
        self._spinning = SPINNING_MODES[specs.get(SPINNING, DEFAULT_SPINNING)]
        # Without the int8 spec, QuantizeLinear/DequantizeLinear run as the fp32 arithmetic
        # PyTorch does; with it ORT fuses them with their ops into its int8 kernels.
        self._int8 = specs.get(PRECISION_SPEC, FP32) == INT8
        self._log_severity = int(specs.get(LOG_SEVERITY, DEFAULT_LOG_SEVERITY))
        self._prepack = specs.get(PREPACK, True)
        self._reference = reference
        self.weight_names = weight_names(reference)
        values = placeholder_values(reference)
        self._expected = dict(zip(self.weight_names, values[: len(self.weight_names)], strict=True))
        self._input_vals = values[len(self.weight_names) :]
        # Only segment weights are made external: without weights there is nothing to find
        # (and no need to import onnx to parse the payload).
        self._external = external_initializers(payload) if self.weight_names else ()
        missing = sorted(set(self._external) - set(self.weight_names))
        if missing:
            raise DelegateCompileError(
                f"onnxruntime payload expects weights {missing} that the segment does not have"
            )
        self._name = "onnxruntime"
        self._init_state(active=None if self._external else self._build({}))
        self._shape_cache: dict[tuple, list[tuple[tuple[int, ...], torch.dtype]]] = {}

    def _file_regions(self, weights: Mapping[str, torch.Tensor]) -> dict[str, FileRegion]:
        """The weights ORT can map from a package file, by initializer name: those still
        the bytes of a file that its path still names, all in one folder (ORT resolves
        every location against one)."""
        regions = {name: file_region(weights[name]) for name in self._external}
        regions = {n: r for n, r in regions.items() if r is not None and is_current(r)}
        folders = sorted({os.path.dirname(r.path) for r in regions.values()})
        return {n: r for n, r in regions.items() if os.path.dirname(r.path) == folders[0]}

    def _build(self, weights: Mapping[str, torch.Tensor], from_files: bool = True) -> _Compiled:
        ort = self._ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.log_severity_level = self._log_severity
        so.add_session_config_entry("session.intra_op.allow_spinning", self._spinning)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self._int8:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        if not self._prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        payload, given = self._payload, list(self._external)
        files = self._file_regions(weights) if from_files else {}
        if files:
            payload = reading_files(payload, files)
            folder = os.path.dirname(next(iter(files.values())).path)
            so.add_session_config_entry(EXTERNAL_FOLDER, folder)
            given = [name for name in given if name not in files]
        arrays = [weights[name].detach().contiguous().cpu() for name in given]
        values = [ort.OrtValue.ortvalue_from_numpy(a.numpy()) for a in arrays]
        if given:
            so.add_external_initializers(given, values)
        # int8: MatMulAddFusion would turn DequantizeLinear -> MatMul -> Add (a quantized
        # linear with fp32 output, export.py) into a Gemm that no int8 kernel takes; without
        # it ORT picks MatMulIntegerToFloat (transformer block: 9.1 ms instead of 11.7 ms).
        disabled = ["MatMulAddFusion"] if self._int8 else []
        session = ort.InferenceSession(
            payload, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
        )
        if files and not all(is_current(r) for r in files.values()):
            # The path names another file now (a new version saved over it): ORT may have
            # read that one. Build from the tensors, which hold the loaded file's bytes.
            return self._build(weights, from_files=False)
        # Kept alive with the session all the same: a release that uses them in place (as it
        # does for add_initializer) must not read freed memory.
        return _Compiled(session, (so, tuple(arrays), tuple(values)))

    # -- weights ---------------------------------------------------------------------------
    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        validate_weights(self._expected, weights, owner="delegate 'onnxruntime'")
        self._stage(self._build(weights))

    # -- running ---------------------------------------------------------------------------
    def _output_specs(self, key: tuple) -> list[tuple[tuple[int, ...], torch.dtype]]:
        specs = self._shape_cache.get(key)
        if specs is None:
            specs = self._specs_from_symbols(key) or self._specs_from_fake_run(key)
            self._shape_cache[key] = specs
        return specs

    def _specs_from_symbols(self, key: tuple) -> list | None:
        """Output shapes by evaluating the reference outputs' symbolic dims at the input
        sizes; None when some output dim is not determined by input dims."""
        import sympy

        env = {}
        for val, (shape, _) in zip(self._input_vals, key, strict=True):
            dims = (
                zip(val.shape, shape, strict=True)
                if isinstance(val, torch.Tensor)
                else [(val, shape)]
            )
            for dim, size in dims:
                if isinstance(dim, torch.SymInt) and dim.node.expr.is_Symbol:
                    env[dim.node.expr] = sympy.Integer(size)
        specs = []
        for out in self._reference.graph.output_node().args[0]:
            val = out.meta.get("val") if isinstance(out, Node) else None
            if not isinstance(val, torch.Tensor):
                return None
            shape = []
            for dim in val.shape:
                if isinstance(dim, torch.SymInt):
                    expr = dim.node.expr.xreplace(env)
                    if not expr.is_Integer:
                        return None
                    dim = int(expr)
                shape.append(dim)
            specs.append((tuple(shape), val.dtype))
        return specs

    def _specs_from_fake_run(self, key: tuple) -> list:
        """Output shapes by running the reference graph on fake inputs of these sizes (with
        the strides the reference was traced with, when the sizes are the traced ones: its
        views may depend on them)."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        def fake(val: Any, shape: Any, dtype: torch.dtype) -> Any:
            if not isinstance(shape, tuple):
                return shape
            if isinstance(val, torch.Tensor) and tuple(val.shape) == shape:
                try:
                    return torch.empty_strided(
                        shape, tuple(int(s) for s in val.stride()), dtype=dtype
                    )
                except TypeError:  # symbolic strides
                    pass
            return torch.empty(shape, dtype=dtype)

        with FakeTensorMode():
            weights = [torch.empty(v.shape, dtype=v.dtype) for v in self._expected.values()]
            args = [
                fake(val, shape, dtype)
                for val, (shape, dtype) in zip(self._input_vals, key, strict=True)
            ]
            outs = self._reference.graph_module(*weights, *args)
        return [(tuple(int(d) for d in o.shape), o.dtype) for o in outs]

    def _plan(self, compiled: _Compiled, key: tuple, inputs: Sequence[Any]) -> _Plan:
        native = compiled.native
        wrapper, binding = native.binding()
        tensor_inputs, shapes, scalars = [], [], []
        for i, value in enumerate(inputs):
            if not isinstance(value, torch.Tensor):
                # A symbolic size computed outside the segment: the exporter made it a scalar
                # input. The plan is keyed by its value, so bind it once here.
                name = compiled.input_names[i]
                onnx_type, onnx_shape = compiled.input_meta[i]
                dtype = _ONNX_TYPES.get(onnx_type)
                if dtype is None:
                    raise DelegateCallError(
                        f"onnxruntime delegate input {name!r} is a Python {type(value).__name__}"
                        f" but the session expects {onnx_type}"
                    )
                scalar = torch.tensor(value, dtype=dtype).reshape([1] * len(onnx_shape))
                binding.bind_input(
                    name, native.cpu, _ELEMENT_TYPES[dtype], scalar.shape, scalar.data_ptr()
                )
                scalars.append(scalar)
                shapes.append((value, None))
                continue
            name = compiled.input_names[i]
            if value.device.type != "cpu":
                raise DelegateCallError(
                    f"onnxruntime delegate input {name!r} is on {value.device}, but this "
                    "session runs on CPU; move inputs to CPU"
                )
            if value.dtype not in _ELEMENT_TYPES:
                raise DelegateCallError(
                    f"onnxruntime delegate input {name!r} has dtype {value.dtype}, which ONNX "
                    "Runtime cannot take"
                )
            tensor_inputs.append((i, name, _ELEMENT_TYPES[value.dtype]))
            shapes.append((tuple(value.shape), value.dtype))
        outputs = tuple(
            (name, _ELEMENT_TYPES[dtype], shape, dtype)
            for name, (shape, dtype) in zip(
                compiled.output_names, self._output_specs(tuple(shapes)), strict=True
            )
        )
        plan = _Plan(wrapper, binding, tuple(tensor_inputs), outputs, scalars)
        compiled.plans()[key] = plan
        return plan

    def run_with(self, compiled: _Compiled, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        # Device is not in the key (building it per call is slow): the input loop below
        # refuses non-CPU tensors before binding.
        key = tuple([(v.shape, v.dtype) if isinstance(v, torch.Tensor) else v for v in inputs])
        plan = compiled.plans().get(key) or self._plan(compiled, key, inputs)
        binding, bound, cpu = plan.binding, plan.bound, compiled.native.cpu
        keep = []  # contiguous copies must live until the run is over
        for j, (i, name, element_type) in enumerate(plan.tensor_inputs):
            t = inputs[i]
            if not t.is_cpu:
                self._plan(compiled, key, inputs)  # raises the error naming the input
            if not t.is_contiguous():
                t = t.contiguous()
                keep.append(t)
            ptr = t.data_ptr() or _NONEMPTY.data_ptr()
            if bound[j] != ptr:  # ORT reads through the pointer at run time
                binding.bind_input(name, cpu, element_type, t.shape, ptr)
                bound[j] = ptr
        buffers = plan.buffers
        for j, buffer in enumerate(buffers):
            if buffer is None or not buffer.released():
                name, element_type, shape, dtype = plan.outputs[j]
                # The caller still sees the last one (or it moved): this one is new, and the
                # plan forgets the old one, which lives on as long as the caller holds it.
                buffer = buffers[j] = OutputBuffer(shape, dtype)
                binding.bind_output(
                    name, cpu, element_type, shape, buffer.ptr or _NONEMPTY.data_ptr()
                )
        compiled.native.run(binding, None)
        return tuple([buffer.alias() for buffer in buffers])

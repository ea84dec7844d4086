"""The onnxruntime delegate's compile step: a segment through torch.onnx.export to a
weight-free ONNX payload.

Weights become initializers named by their targets (`optimize=False` keeps them unfolded;
ONNX Runtime folds constants itself when it builds a session). The payload carries no weight
data: those initializers are marked external, and every session is given them when it is
built (executor.py), so payloads stay small and weight-free for saving and caching.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert._program import copy_graph_module, rebuild_program, weight_names
from nativert._program.mapped import FileRegion
from nativert._program.quant import cpu_has_int8_dot, full_range
from nativert.backend.delegates.onnxruntime import proto
from nativert.delegate import FP32, INT8, PRECISION_SPEC, CompileSpec
from nativert.errors import DelegateCompileError, first_line

aten = torch.ops.aten
QUANTIZE_PER_TENSOR = torch.ops.quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE_PER_TENSOR = torch.ops.quantized_decomposed.dequantize_per_tensor.default
DEQUANTIZE_PER_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_EXTERNAL_MARKER = "nativert:weights"  # initializers whose data comes from the weights
# Session config: the folder ONNX Runtime resolves external data locations against.
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def strip_weights(proto: Any, names: set[str]) -> None:
    """Drop the data of initializers that are segment weights; mark them external."""
    import onnx

    for init in proto.graph.initializer:
        if init.name not in names:
            continue
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            init.ClearField(field)
        del init.external_data[:]
        init.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", _EXTERNAL_MARKER), ("offset", "0"), ("length", "0")):
            entry = init.external_data.add()
            entry.key, entry.value = key, value


def external_initializers(payload: bytes) -> tuple[str, ...]:
    model = proto.parse(payload)
    return tuple(
        init.name
        for init in model.graph.initializer
        if any(e.key == "location" and e.value == _EXTERNAL_MARKER for e in init.external_data)
    )


def reading_files(payload: bytes, regions: Mapping[str, FileRegion]) -> bytes:
    """The payload with the external initializers in `regions` read from those file regions
    (all in one folder: ONNX Runtime resolves locations against one) instead of supplied."""
    model = proto.parse(payload)
    for init in model.graph.initializer:
        region = regions.get(init.name)
        if region is None:
            continue
        del init.external_data[:]
        for key, value in (
            ("location", os.path.basename(region.path)),
            ("offset", str(region.offset)),
            ("length", str(region.nbytes)),
        ):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString()


def check_untrusted(payload: bytes) -> None:
    """Raise ValueError unless the payload is an ONNX model whose only external data are
    the weights nativert supplies: a model naming files (external data at other locations)
    would make ONNX Runtime read them."""
    try:
        model = proto.parse(payload)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"not an ONNX model ({type(exc).__name__}: {exc})") from None
    for tensor in proto.tensors(model.graph):
        locations = [e.value for e in tensor.external_data if e.key == "location"]
        if tensor.data_location == proto.EXTERNAL and locations != [_EXTERNAL_MARKER]:
            raise ValueError(
                f"tensor {tensor.name!r} reads external data from {locations}; nativert payloads "
                "take their weights from the program, never from files"
            )
    if (
        model.functions
        or model.training_info
        or any(op.domain not in ("", "ai.onnx", "com.microsoft") for op in model.opset_import)
    ):
        raise ValueError(
            "it uses ONNX functions, training info or operator domains nativert never writes"
        )


def _export_failure(exc: BaseException) -> str:
    """The failing node and the root cause from torch.onnx's chain of ConversionErrors."""
    node, chain = None, []
    while exc is not None:
        first = first_line(exc) or type(exc).__name__
        found = re.match(r"Error when translating node %(\w+) : .*?target=([\w.:]+)", first)
        if found:
            node = f"node {found.group(1)!r} ({found.group(2).removeprefix('torch.ops.')})"
        chain.append(f"{type(exc).__name__}: {first}")
        exc = exc.__cause__
    where = f"cannot translate {node}: " if node else ""
    return where + chain[-1]


THREADS = "intra_op_num_threads"
# Whether ORT's intra-op threads keep spinning when idle (session.intra_op.allow_spinning):
# "always" (ORT's default) or "never". Measured (benchmarks/results/executor_overhead.md,
# 2 cores): spinning threads take the cores that PyTorch's threads (nodes between delegate
# calls) or another runtime in the process need next: a custom op between two ORT regions
# ran ~10x slower with "always" than with "never", and an ORT model alternating with an eager
# model ~2x. Alone and called back to back, ORT needs them: "never" made an MLP lowered
# whole 1.5x slower, as every call then wakes sleeping threads.
SPINNING = "intra_op_spinning"
SPINNING_MODES = {"always": "1", "never": "0"}
DEFAULT_SPINNING = "always"
# ONNX Runtime's C++ log for the session: 0 verbose, 1 info, 2 warning, 3 error (default:
# its constant-folding notes, "Could not find a CPU kernel and hence can't constant fold",
# say nothing about the model), 4 fatal.
LOG_SEVERITY = "log_severity_level"
DEFAULT_LOG_SEVERITY = 3
# Whether ONNX Runtime repacks matrix weights into its kernels' layout when a session is
# built (its default). Measured (benchmarks/prepack.md, suite models at 2 threads): repacked
# weights are 6-16% faster on linear-heavy models, but the packed copy is private to the
# process, so processes serving one package cannot share it (benchmarks/memory.md); with
# False a session reads the weights where they are (a loaded package's mapped pages, shared
# by every process).
PREPACK = "prepack_weights"
SPEC_KEYS = (THREADS, SPINNING, LOG_SEVERITY, PRECISION_SPEC, PREPACK)
PRECISIONS = (FP32, INT8)  # int8: the QDQ patterns of a quantized region on int8 kernels


def check_values(values: Mapping[str, Any]) -> None:
    """Raise ValueError naming a compile spec whose value is not one it takes."""
    threads = values.get(THREADS, 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 1024:
        raise ValueError(
            f"compile spec {THREADS!r} must be an int from 0 (ONNX Runtime's default) to 1024, "
            f"got {threads!r}"
        )
    severity = values.get(LOG_SEVERITY, DEFAULT_LOG_SEVERITY)
    if isinstance(severity, bool) or severity not in range(5):
        raise ValueError(
            f"compile spec {LOG_SEVERITY!r} must be 0 (verbose) to 4 (fatal), got {severity!r}"
        )
    precision = values.get(PRECISION_SPEC, FP32)
    if precision not in PRECISIONS:
        raise ValueError(
            f"compile spec {PRECISION_SPEC!r} must be one of {list(PRECISIONS)} for onnxruntime, "
            f"got {precision!r}"
        )
    if not isinstance(values.get(PREPACK, True), bool):
        raise ValueError(f"compile spec {PREPACK!r} must be True or False, got {values[PREPACK]!r}")
    spinning = values.get(SPINNING, DEFAULT_SPINNING)
    if not isinstance(spinning, str) or spinning not in SPINNING_MODES:
        raise ValueError(
            f"compile spec {SPINNING!r} must be one of {list(SPINNING_MODES)}, got {spinning!r}"
        )


def options(compile_specs: Sequence[CompileSpec]) -> dict[str, Any]:
    """The compile specs as a dict; unknown ones, or values of the wrong type, raise."""
    values = {spec.key: spec.value for spec in compile_specs}
    unknown = sorted(set(values) - set(SPEC_KEYS))
    if unknown:
        raise DelegateCompileError(
            f"onnxruntime: unknown compile specs {unknown}; valid: {list(SPEC_KEYS)}"
        )
    try:
        check_values(values)
    except ValueError as exc:
        raise DelegateCompileError(f"onnxruntime: {exc}") from None
    return values


# Ops whose output layout depends on the kernel a trace picks (see _fixed_layouts).
_LAYOUT_VARIES = (torch.ops.aten.scaled_dot_product_attention.default,)


def _fixed_layouts(program: ExportedProgram) -> ExportedProgram:
    """`program` with a contiguous clone after each op whose output strides depend on the
    kernel a trace picks (ONNX has no strides: the clone costs nothing there).

    torch.onnx.export traces the segment twice: run_decompositions turns each `reshape` into
    a `view` where the strides it sees allow one, then its type-promotion pass runs the
    graph again on fake tensors. SDPA's output is sequence-major in the first trace and
    head-major in the second, so T5's `transpose(1, 2).reshape(...)` became a view that
    the second trace rejects ("Cannot view a tensor with shape ...")."""
    targets = [n for n in program.graph.nodes if n.target in _LAYOUT_VARIES]
    if not targets:
        return program
    gm = copy_graph_module(program)
    for node in gm.graph.nodes:
        if node.target not in _LAYOUT_VARIES:
            continue
        with gm.graph.inserting_after(node):
            clone = gm.graph.call_function(
                torch.ops.aten.clone.default, (node,), {"memory_format": torch.contiguous_format}
            )
        node.replace_all_uses_with(clone, delete_user_cb=lambda user, c=clone: user is not c)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            clone.meta["val"] = val.clone(memory_format=torch.contiguous_format)
    gm.recompile()
    return rebuild_program(program, gm)


def _onnx_quantization(program: ExportedProgram, int8: bool) -> ExportedProgram:
    """`program` with its quantize/dequantize nodes in the forms ONNX computes as PyTorch
    does, and ONNX Runtime runs fast:

    - a per-tensor quantize to a narrower range than its dtype's (PT2E's `reduce_range`:
      0..127 in a uint8) clamps its input first: QuantizeLinear saturates to the dtype's
      full range, where PyTorch clamps to quant_min..quant_max;
    - with `int8` on an x86 CPU without VNNI or AMX, int8 weights are dequantized from
      uint8 (w + 128 with zero point + 128: the same values) so that ONNX Runtime picks its
      u8 x u8 kernels: its u8 x s8 ones saturate on such CPUs (see cpu_has_int8_dot). ONNX
      Runtime folds the conversion into the initializer when it builds the session."""
    narrow = [n for n in program.graph.nodes if _narrow_quantize(n)]
    unsigned = [n for n in program.graph.nodes if int8 and _signed_weight_dequantize(n)]
    batched = [n for n in program.graph.nodes if int8 and _batched_quantized_linear(n)]
    if not narrow and not unsigned and not batched:
        return program
    # by name: the rewrite works on a copy of the graph
    narrow_names, unsigned_names = {n.name for n in narrow}, {n.name for n in unsigned}
    batched_names = {n.name for n in batched}
    gm = copy_graph_module(program)
    graph = gm.graph
    for node in graph.nodes:
        if node.name in narrow_names:
            x, scale, zero_point, qmin, qmax, dtype = node.args[:6]
            low, high = full_range(dtype)
            with graph.inserting_before(node):
                bounds = ((qmin - zero_point) * scale, (qmax - zero_point) * scale)
                clamped = graph.call_function(aten.clamp.default, (x, *bounds))
            clamped.meta["val"] = x.meta["val"]
            node.args = (clamped, scale, zero_point, low, high, dtype, *node.args[6:])
        elif node.name in unsigned_names:
            weight, scale, zero_point = node.args[:3]
            rest = list(node.args[3:])
            with graph.inserting_before(node):
                wide = graph.call_function(aten._to_copy.default, (weight,), {"dtype": torch.int16})
                shifted = graph.call_function(aten.add.Tensor, (wide, 128))
                weight_u8 = graph.call_function(
                    aten._to_copy.default, (shifted,), {"dtype": torch.uint8}
                )
                if isinstance(zero_point, torch.fx.Node):
                    zero_point = graph.call_function(aten.add.Tensor, (zero_point, 128))
                    zero_point.meta["val"] = zero_point.args[0].meta["val"]
                else:
                    zero_point = (zero_point or 0) + 128
            fake = weight.meta["val"]
            wide.meta["val"] = torch.empty_like(fake, dtype=torch.int16)
            shifted.meta["val"] = torch.empty_like(fake, dtype=torch.int16)
            weight_u8.meta["val"] = torch.empty_like(fake, dtype=torch.uint8)
            # (quant_min, quant_max, dtype) follow zero_point (per channel: and axis)
            at = 1 if node.target is DEQUANTIZE_PER_CHANNEL else 0
            rest[at : at + 3] = [0, 255, torch.uint8]
            node.args = (weight_u8, scale, zero_point, *rest)
    for node in list(graph.nodes):
        if node.name in batched_names:
            _as_matrix_linear(graph, node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return rebuild_program(program, gm)


def _batched_quantized_linear(node: torch.fx.Node) -> bool:
    """A linear of a dequantized weight on a batched (rank > 2) input, or with an fp32
    output: torchlib exports the first as MatMul(x, Transpose(W)), and the Transpose between
    DequantizeLinear and MatMul keeps ONNX Runtime from fusing it into an int8 kernel
    (measured: the transformer block ran slower in int8 than in fp32); the second as a Gemm
    it runs in fp32 (see _requantized). Static shapes only."""
    if node.target is not aten.linear.default or len(node.args) < 2:
        return False
    x, weight = node.args[:2]
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return (
        isinstance(weight, torch.fx.Node)
        and weight.target in (DEQUANTIZE_PER_TENSOR, DEQUANTIZE_PER_CHANNEL)
        and isinstance(val, torch.Tensor)
        and (val.dim() > 2 or (val.dim() == 2 and not _requantized(node)))
        and not any(isinstance(d, torch.SymInt) for d in val.shape)
    )


def _requantized(node: torch.fx.Node) -> bool:
    """Whether `node`'s output is quantized (directly or after a relu): a Gemm that ONNX
    Runtime fuses into QGemm. One whose output stays fp32 it leaves an fp32 Gemm (the MLP's
    last layer), where DequantizeLinear -> MatMul becomes MatMulIntegerToFloat."""
    users = list(node.users)
    if len(users) == 1 and users[0].target is aten.relu.default:
        users = list(users[0].users)
    return bool(users) and all(u.target is QUANTIZE_PER_TENSOR for u in users)


def _as_matrix_linear(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """`linear(dq(q(x)), dq(w), b)` on an [..., K] input as `mm(dq(q(x2)), dq(w.T)) + b`
    with `x2 = x.reshape(-1, K)`, reshaped back: a MatMul whose inputs come straight from
    DequantizeLinear, which ONNX Runtime fuses into its int8 MatMul kernels (the transpose
    moves onto the int8 weight, which it folds). Q/DQ per tensor commute with reshape, so the
    values are the same. Activations not from a quantize -> dequantize pair are reshaped
    after their dequantize."""
    x, weight_dq = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    val, out = x.meta["val"], node.meta["val"]
    rows, k, n = math.prod(int(d) for d in val.shape[:-1]), int(val.shape[-1]), int(out.shape[-1])

    def fake(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty_like(val, dtype=dtype, memory_format=torch.contiguous_format).new_empty(
            shape
        )

    with graph.inserting_before(node):
        q = x.args[0] if x.target is DEQUANTIZE_PER_TENSOR else None
        if q is not None and q.target is QUANTIZE_PER_TENSOR and len(q.users) == len(x.users) == 1:
            flat = graph.call_function(aten.reshape.default, (q.args[0], [rows, k]))
            flat.meta["val"] = fake([rows, k], q.args[0].meta["val"].dtype)
            q2 = graph.call_function(q.target, (flat, *q.args[1:]))
            q2.meta["val"] = fake([rows, k], q.meta["val"].dtype)
            activation = graph.call_function(x.target, (q2, *x.args[1:]), x.kwargs)
        else:
            activation = graph.call_function(aten.reshape.default, (x, [rows, k]))
        activation.meta["val"] = fake([rows, k], val.dtype)
        weight = weight_dq.args[0]
        transposed = graph.call_function(aten.permute.default, (weight, [1, 0]))
        transposed.meta["val"] = fake([k, n], weight.meta["val"].dtype)
        args = list(weight_dq.args)
        args[0] = transposed
        if weight_dq.target is DEQUANTIZE_PER_CHANNEL:
            args[3] = 1  # the output channels are now dim 1
        weight_t = graph.call_function(weight_dq.target, tuple(args), weight_dq.kwargs)
        weight_t.meta["val"] = fake([k, n], torch.float32)
        product = graph.call_function(aten.mm.default, (activation, weight_t))
        product.meta["val"] = fake([rows, n], out.dtype)
        if bias is not None:
            product = graph.call_function(aten.add.Tensor, (product, bias))
            product.meta["val"] = fake([rows, n], out.dtype)
        shaped = graph.call_function(aten.reshape.default, (product, list(out.shape)))
    shaped.meta["val"] = out
    node.replace_all_uses_with(shaped)
    graph.erase_node(node)


def _narrow_quantize(node: torch.fx.Node) -> bool:
    if node.target is not QUANTIZE_PER_TENSOR:
        return False
    dtype = node.args[5]
    return (node.args[3], node.args[4]) != full_range(dtype)


def _signed_weight_dequantize(node: torch.fx.Node) -> bool:
    if node.target not in (DEQUANTIZE_PER_TENSOR, DEQUANTIZE_PER_CHANNEL):
        return False
    weight = node.args[0]
    val = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    return (
        weight.op == "placeholder"
        and isinstance(val, torch.Tensor)
        and val.dtype == torch.int8
        and not cpu_has_int8_dot()
    )


def export(program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
    """The segment as a weight-free ONNX model (bytes)."""
    int8 = options(compile_specs).get(PRECISION_SPEC, FP32) == INT8
    try:
        onnx_program = torch.onnx.export(
            _fixed_layouts(_onnx_quantization(program, int8)),
            dynamo=True,
            optimize=False,
            verbose=False,
        )
    except Exception as exc:
        raise DelegateCompileError(f"torch.onnx.export failed: {_export_failure(exc)}") from exc
    proto = onnx_program.model_proto
    strip_weights(proto, set(weight_names(program)))
    return proto.SerializeToString()

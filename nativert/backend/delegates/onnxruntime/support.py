"""Which core ATen ops the onnxruntime delegate runs.

The table is the core ATen ops (plus the ops we preserve whole) that torch.onnx's exporter
registry implements, minus the ones we found to fail, restricted to the dtypes ONNX Runtime's
CPU kernels cover. Each op was probed alone against eager on the argument forms real models
use (index with None and negative indices, bilinear resize with align_corners both ways and
fractional scales, ...); where only some forms export and match, a checker in CHECKS admits
just those and says why for the rest. tests/backend/delegates/test_onnxruntime_support.py
lowers every op in the table on a tiny sample and runs it in ORT; an op that stops exporting
or running fails that test, and one in KNOWN_FAILURES that starts working fails it too.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from nativert._program.quant import QUANTIZE_OPS
from nativert.delegate.support import SupportTable, all_of, dtypes, static_shapes

aten = torch.ops.aten

# Ops ORT runs better as one node than decomposed (fused kernels, fewer copies).
PRESERVED = (
    aten.linear.default,
    aten.layer_norm.default,
    aten.scaled_dot_product_attention.default,
    aten.group_norm.default,
    # One ONNX LSTM op instead of the hundreds of core ATen ops decomposition unrolls it into
    # (x3.4 faster than eager vs x0.83 unrolled, benchmarks/suite.py).
    aten.lstm.input,
    # One ONNX Resize instead of the index/clamp arithmetic decomposition makes of them (the
    # torch.compile path decomposed DeepLabV3's upsampling into ~30 nodes).
    aten.upsample_bilinear2d.vec,
    aten.upsample_nearest2d.vec,
)

CANDIDATES = (
    *PRESERVED,
    # elementwise, unary
    aten.abs.default,
    aten.neg.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.reciprocal.default,
    aten.sin.default,
    aten.cos.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.relu.default,
    aten.gelu.default,
    aten.erf.default,
    aten.floor.default,
    aten.ceil.default,
    aten.sign.default,
    aten.logical_not.default,
    aten.log1p.default,
    aten.isnan.default,
    aten.elu.default,
    aten.clamp.default,
    aten.clamp.Tensor,
    aten.leaky_relu.default,
    aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor,
    aten.hardtanh.default,
    # elementwise, binary and comparisons
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.maximum.default,
    aten.minimum.default,
    aten.eq.Scalar,
    aten.eq.Tensor,
    aten.ne.Scalar,
    aten.lt.Scalar,
    aten.lt.Tensor,
    aten.le.Scalar,
    aten.le.Tensor,
    aten.gt.Scalar,
    aten.gt.Tensor,
    aten.ge.Scalar,
    aten.ge.Tensor,
    aten.logical_and.default,
    aten.logical_or.default,
    aten.bitwise_and.Tensor,
    aten.bitwise_or.Tensor,
    aten.bitwise_not.default,
    aten.where.self,
    # linear algebra and convolution
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.convolution.default,
    # reductions
    aten.sum.dim_IntList,
    aten.mean.dim,
    aten.mean.default,
    aten.amax.default,
    aten.amin.default,
    aten.argmax.default,
    aten.any.dim,
    aten.var.correction,
    aten.var_mean.correction,
    aten.cumsum.default,
    aten.linalg_vector_norm.default,
    # normalization and softmax
    aten.native_layer_norm.default,
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.no_stats,  # InstanceNorm, BatchNorm without running stats
    aten.native_group_norm.default,
    aten._softmax.default,
    aten._log_softmax.default,
    # pooling and resizing
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten.max_pool2d_with_indices.default,
    aten.max_pool3d_with_indices.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
    aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool3d.default,
    aten.upsample_bilinear2d.vec,
    aten.upsample_nearest2d.vec,
    aten.upsample_nearest2d.default,
    # views, shapes, copies
    aten.view.default,
    aten.permute.default,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.unsqueeze.default,
    aten.squeeze.dims,
    aten.cat.default,
    aten.split_with_sizes.default,
    aten.as_strided.default,
    aten.repeat.default,
    aten.clone.default,
    aten.copy.default,
    aten._to_copy.default,
    aten.alias.default,
    aten.constant_pad_nd.default,
    aten.slice_scatter.default,
    # creation and indexing
    aten.full.default,
    aten.full_like.default,
    aten.arange.start_step,
    aten.empty.memory_format,  # values unspecified: ONNX Runtime's zeros are as good
    aten.empty_permuted.default,
    aten.embedding.default,
    aten.index_select.default,
    aten.gather.default,
    aten.index.Tensor,
    aten.scalar_tensor.default,
)

# Not in the exporter's registry, but the exporter decomposes them into ops that are (the
# sample test proves they export and run).
VIA_EXPORTER_DECOMPOSITION = (
    aten.squeeze.dims,
    aten.var.correction,
    aten.var_mean.correction,
    aten._adaptive_avg_pool2d.default,
    aten.adaptive_max_pool2d.default,
    aten.adaptive_max_pool3d.default,
)

# Found to fail (export or run) on torch 2.13 / onnxruntime 1.32; kept out of the table.
# The support test checks that each still fails, so a torch that fixes one says so.
KNOWN_FAILURES: dict[torch._ops.OpOverload, str] = {
    aten._adaptive_avg_pool3d.default: (
        "torch.onnx has neither a function nor a decomposition: No ONNX function found for "
        "<OpOverload(op='aten._adaptive_avg_pool3d', overload='default')>"
    ),
    # what torch.empty_like leaves
    aten.empty_permuted.default: (
        "torch.onnx has neither a function nor a decomposition: No ONNX function found for "
        "<OpOverload(op='aten.empty_permuted', overload='default')>"
    ),
}

DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool)


def exporter_ops() -> frozenset[torch._ops.OpOverload]:
    """Ops torch.onnx's exporter registry has an implementation for."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    registry = ONNXRegistry.from_torchlib()
    return frozenset(
        op
        for op in (*CANDIDATES, *QDQ)
        if registry.is_registered(op) or op in VIA_EXPORTER_DECOMPOSITION
    )


def build_table() -> SupportTable:
    """The support table: CANDIDATES minus KNOWN_FAILURES.

    Static on purpose: asking the exporter's registry costs about 1.5 s per process (it
    imports all of torchlib), which dominated a cached torch.compile. The tests check that
    every op here is in the installed exporter's registry and exports and runs in ORT.
    """
    entries = {op: CHECKS.get(op) for op in CANDIDATES if op not in KNOWN_FAILURES}
    entries.update(dict.fromkeys(QDQ, check_qdq))
    float_dtypes = dtypes(*DTYPES)
    return SupportTable(
        entries, every_op=lambda node: None if node.target in QDQ else float_dtypes(node)
    )


# PT2E's quantize / dequantize (QuantizeLinear / DequantizeLinear; export.py makes narrow
# quant ranges exact). The partitioner delegates them only with the ops they quantize.
_qd = torch.ops.quantized_decomposed
# The .tensor overloads (qparams as tensors: dynamic quantization) fail in torchlib
# ("int() argument must be ... not 'SymbolicTensor'", onnxscript 0.7.2): not here.
QDQ = (
    _qd.quantize_per_tensor.default,
    _qd.dequantize_per_tensor.default,
    _qd.quantize_per_channel.default,
    _qd.dequantize_per_channel.default,
)


def check_qdq(node: Node) -> str | None:
    """float32 on one side, uint8/int8 on the other (a narrow quant range is made exact by
    export.py)."""
    quantize = node.target in QUANTIZE_OPS
    data = node.args[0].meta.get("val")
    out = node.meta.get("val")
    floating, quantized = (data, out) if quantize else (out, data)
    if not isinstance(floating, torch.Tensor) or floating.dtype != torch.float32:
        return "quantizes or dequantizes a tensor that is not float32"
    if not isinstance(quantized, torch.Tensor) or quantized.dtype not in (torch.uint8, torch.int8):
        return "quantized dtype other than uint8/int8"
    return None


def _lstm_without_training_dropout(node: Node) -> str | None:
    # lstm.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, ...)
    dropout, train = node.args[5], node.args[6]
    if train and dropout:
        return "LSTM dropout in training mode (ONNX LSTM has no dropout)"
    return None


def _arg(node: Node, index: int, name: str, default=None):
    """Argument `index` (or keyword `name`) of the node, or `default` when not given."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def _value(arg: object) -> torch.Tensor | None:
    value = arg.meta.get("val") if isinstance(arg, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _float_input(node: Node) -> str | None:
    value = _value(node.args[0])
    if value is not None and not value.is_floating_point():
        return f"{_dtype_name(value.dtype)} input (ONNX IsNaN takes floating point only)"
    return None


def _int64_indices(node: Node) -> str | None:
    # index.Tensor(self, Tensor?[] indices): None keeps a dimension whole.
    for index in node.args[1]:
        value = _value(index)
        if index is None or (value is not None and value.dtype == torch.int64):
            continue
        dtype = value.dtype if value is not None else None
        if dtype in (torch.bool, torch.uint8):
            return "a boolean mask index (the result's shape depends on the data)"
        name = _dtype_name(dtype) if dtype is not None else "unknown"
        return f"{name} indices (ONNX Runtime's GatherND takes int64 only)"
    return None


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, comparing symbolic dims by expression (no guards added)."""
    if a.dim() != b.dim():
        return False
    for x, y in zip(a.shape, b.shape, strict=True):
        x = x.node.expr if isinstance(x, torch.SymInt) else x
        y = y.node.expr if isinstance(y, torch.SymInt) else y
        if x != y:
            return False
    return True


def _copy_without_broadcast(node: Node) -> str | None:
    # copy(self, src): torch broadcasts src to self's shape; torch.onnx's copy returns src's.
    dst, src = _value(node.args[0]), _value(node.args[1])
    if dst is not None and src is not None and not _same_shape(dst, src):
        return "copy that broadcasts its source (torch.onnx returns the source's shape)"
    return None


def _as_strided_in_bounds(node: Node) -> str | None:
    """as_strided of a contiguous input that reads only that input's elements.

    ONNX has no storage: torch.onnx gathers from the input's values flattened in row-major
    order, with an explicit storage_offset counted from the input's first element. That is
    what torch reads when the input is contiguous, reads stay inside it, and an explicit
    offset starts from a tensor that starts its storage (what convnext's stride fix-up after
    a mean emits)."""
    source = _value(node.args[0])
    size, stride = list(node.args[1]), list(node.args[2])
    offset = _arg(node, 3, "storage_offset")
    if source is None:
        return "as_strided of a value without metadata"
    numbers = [*size, *stride, *source.shape, source.storage_offset()]
    if offset is not None:
        numbers.append(offset)
    if not all(isinstance(n, int) for n in numbers):
        return "as_strided with symbolic sizes, strides or offsets"
    if not source.is_contiguous():
        return (
            "as_strided of a non-contiguous tensor (ONNX has no strides: it would read the "
            "values in another order)"
        )
    if offset is not None and source.storage_offset() != 0:
        return "as_strided with an explicit storage_offset on a view that starts mid-storage"
    start = offset or 0
    if 0 in size:
        return None
    last = start + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if start < 0 or min(stride, default=0) < 0 or last >= source.numel():
        return "as_strided that reads storage outside its input tensor"
    return None


def _no_divisor_override(node: Node) -> str | None:
    # avg_pool{2,3}d(self, kernel_size, stride, padding, ceil_mode, count_include_pad,
    # divisor_override): torch.onnx ignores the override (wrong values).
    if _arg(node, 6, "divisor_override") is not None:
        return "divisor_override (torch.onnx ignores it)"
    return None


def _adaptive_pool(*, divisible: bool):
    """Static spatial sizes: torch.onnx decomposes adaptive pools into fixed windows, right
    only for the traced size (exported at 6x6 to 2x3, a 7x7 input gave errors of 1.7 and a
    12x12 one a 4x6 output). Max pools also need sizes divisible by the output size: only
    those decompose (into MaxPool); the rest fail ("No ONNX function found for
    aten.adaptive_max_pool2d")."""

    def check(node: Node) -> str | None:
        source, output_size = _value(node.args[0]), list(node.args[1])
        if source is None:
            return "an adaptive pool of a value without metadata"
        spatial = list(source.shape[-len(output_size) :])
        if not all(isinstance(n, int) for n in (*spatial, *output_size)):
            return "an adaptive pool over dynamic spatial sizes (torch.onnx fixes its windows)"
        if divisible and any(n % m for n, m in zip(spatial, output_size, strict=True)):
            return (
                f"an adaptive max pool from {spatial} to {output_size} (torch.onnx converts only "
                "sizes that divide evenly)"
            )
        return None

    return check


def _elu_without_input_scale(node: Node) -> str | None:
    # elu(self, alpha, scale, input_scale): ONNX Elu has alpha only; torch.onnx applies scale
    # but drops input_scale (wrong values).
    if _arg(node, 3, "input_scale", 1) != 1:
        return "elu with input_scale != 1 (torch.onnx drops it)"
    return None


def _batch_statistics(node: Node) -> str | None:
    # _native_batch_norm_legit.no_stats(input, weight, bias, training, momentum, eps):
    # without running stats only training=True is valid in torch too.
    if not _arg(node, 3, "training"):
        return "batch norm without running statistics outside training mode"
    return None


# The gradient probe at lowering (nativert/_program/gradients.py) runs each op on fake
# values; upsample_*.vec's C++ composite kernel turns symbolic sizes into ints there, which
# specialises the program's dynamic dims (the next call with another size is rejected).
_UPSAMPLE_STATIC = "upsample_*.vec with dynamic shapes (the gradient probe would specialise them)"


_static_shapes = static_shapes()


def _static_upsample(node: Node) -> str | None:
    return _UPSAMPLE_STATIC if _static_shapes(node) is not None else None


CHECKS = {
    aten.lstm.input: _lstm_without_training_dropout,
    aten.index.Tensor: _int64_indices,
    # float16 fails in ORT ("Unexpected output data type. Actual: (tensor(float16)) ,
    # expected: (tensor(float))").
    aten.cumsum.default: dtypes(*(d for d in DTYPES if d != torch.float16)),
    aten.isnan.default: _float_input,
    aten.copy.default: _copy_without_broadcast,
    aten.as_strided.default: _as_strided_in_bounds,
    aten.avg_pool2d.default: _no_divisor_override,
    aten.avg_pool3d.default: _no_divisor_override,
    aten._adaptive_avg_pool2d.default: _adaptive_pool(divisible=False),
    aten.adaptive_max_pool2d.default: _adaptive_pool(divisible=True),
    aten.adaptive_max_pool3d.default: _adaptive_pool(divisible=True),
    # ORT has no float64 Elu kernel ("Could not find an implementation for Elu(6)").
    aten.elu.default: all_of(dtypes(torch.float32, torch.float16), _elu_without_input_scale),
    # float64 and float16: torch.onnx adds a float32 eps to the saved statistics ("Type
    # parameter (T) of Optype (Add) bound to different types (tensor(double) and
    # tensor(float)").
    aten._native_batch_norm_legit.no_stats: all_of(dtypes(torch.float32), _batch_statistics),
    aten.upsample_bilinear2d.vec: _static_upsample,
    aten.upsample_nearest2d.vec: _static_upsample,
}

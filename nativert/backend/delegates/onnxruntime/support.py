"""Which core ATen ops the onnxruntime delegate runs.

The table is the core ATen ops (plus the ops we preserve whole) that torch.onnx's exporter
registry implements, minus the ones we found to fail, restricted to the dtypes ONNX Runtime's
CPU kernels cover. tests/backend/test_onnxruntime_support.py lowers every op in it on a tiny
sample and runs it in ORT; an op that stops exporting or running fails that test.
"""

from __future__ import annotations

import torch

from nativert.delegate.support import SupportTable, all_of, dtypes

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
    aten.clamp.default,
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
    aten.gt.Scalar,
    aten.gt.Tensor,
    aten.ge.Scalar,
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
    aten.amax.default,
    aten.amin.default,
    aten.argmax.default,
    aten.any.dim,
    aten.var.correction,
    # normalization and softmax
    aten.native_layer_norm.default,
    aten._native_batch_norm_legit_no_training.default,
    aten.native_group_norm.default,
    aten._softmax.default,
    aten._log_softmax.default,
    # pooling
    aten.avg_pool2d.default,
    aten.max_pool2d_with_indices.default,
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
    aten.clone.default,
    aten._to_copy.default,
    aten.alias.default,
    aten.constant_pad_nd.default,
    # creation and indexing
    aten.full.default,
    aten.full_like.default,
    aten.arange.start_step,
    aten.embedding.default,
    aten.index_select.default,
    aten.gather.default,
    aten.scalar_tensor.default,
)

# Not in the exporter's registry, but the exporter decomposes them into ops that are (the
# sample test proves they export and run).
VIA_EXPORTER_DECOMPOSITION = (aten.squeeze.dims, aten.var.correction)

# Found to fail (export or run) on torch 2.13 / onnxruntime 1.32; kept out of the table.
KNOWN_FAILURES: dict[torch._ops.OpOverload, str] = {}

DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool)


def exporter_ops() -> frozenset[torch._ops.OpOverload]:
    """Ops torch.onnx's exporter registry has an implementation for."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    registry = ONNXRegistry.from_torchlib()
    return frozenset(
        op for op in CANDIDATES if registry.is_registered(op) or op in VIA_EXPORTER_DECOMPOSITION
    )


def build_table() -> SupportTable:
    """The support table: CANDIDATES minus KNOWN_FAILURES.

    Static on purpose: asking the exporter's registry costs about 1.5 s per process (it
    imports all of torchlib), which dominated a cached torch.compile. The tests check that
    every op here is in the installed exporter's registry and exports and runs in ORT.
    """
    entries = {op: CHECKS.get(op) for op in CANDIDATES if op not in KNOWN_FAILURES}
    return SupportTable(entries, every_op=all_of(dtypes(*DTYPES)))


def _lstm_without_training_dropout(node) -> str | None:
    # lstm.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, ...)
    dropout, train = node.args[5], node.args[6]
    if train and dropout:
        return "LSTM dropout in training mode (ONNX LSTM has no dropout)"
    return None


CHECKS = {aten.lstm.input: _lstm_without_training_dropout}

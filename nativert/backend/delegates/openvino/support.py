"""Which core ATen ops the openvino delegate runs, and on which dtypes.

Built empirically (torch 2.13, openvino 2026.4): the core ATen ops of the onnxruntime table
plus a few more (pooling, upsampling, cumsum, argmin, max.dim, expm1, log1p), each
converted alone by OpenVINO's PyTorch frontend, run on the CPU plugin and compared with
eager, per dtype. tests/backend/delegates/test_openvino.py runs every op in the table on
every dtype the table allows it and fails by name when one stops converting or matching.

Left out, and why:
- softplus, elu, trunc, sub.Scalar: no converter (or it fails). layer_norm and group_norm
  have none either, but are in: kept whole by decomposition (as for onnxruntime), they are
  respelled as their native_* forms before conversion (convert._frontend_spelling);
  group_norm only with static shapes.
- lstm.input: the converter rejects core ATen's form; native_dropout: wrong outputs.
- index.Tensor beyond one index tensor on the first dimension (`x[idx]`): not checked.
- topk is in; among equal values the order of the indices it returns may differ from
  torch's (torch does not specify that order either).
- float64, float16, bfloat16: the CPU plugin computes them in float32 (f16/bf16 results
  would also round differently from eager's per-op rounding).
- int64 *data*: the CPU plugin narrows int64 to int32 (2**40 + 2**40 gives 0, even with
  EXECUTION_MODE_HINT=ACCURACY), so int64 tensors are accepted only where int32 computes
  them exactly: indices read by embedding, index_select and gather (ARG_DTYPES, which also
  lets attention masks be bool); indices returned by argmax, argmin, max.dim, topk and
  max_pool2d; arange, full and scalar_tensor with int32-sized literals; and values that are
  only moved, compared or offset by small literals (INT64_LIMIT: position ids and masks,
  as transformers compute them), every int64 tensor entering a segment being checked to lie
  within +-2**30.

Known differences kept (NaN only): NaN does not propagate through maximum, minimum, amax,
amin, relu and clamp as it does in torch, and logical_not(NaN) is True.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch.fx import Node

from nativert.delegate.support import SupportTable

aten = torch.ops.aten

# Ops decomposition keeps whole for OpenVINO: its fused SDPA kernel, MatMul on linear, and
# its MVN normalizations (one node each instead of the mean/var/rsqrt chains).
PRESERVED = (
    aten.linear.default,
    aten.scaled_dot_product_attention.default,
    aten.layer_norm.default,
    aten.group_norm.default,
)

# Ops that only move values (views, shapes, copies): int64 values keep their bound through
# them (INT64_MOVES).
MOVES = (
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
    aten.alias.default,
)
# Comparisons: int64 operands within the bound compare exactly (INT64_COMPARES).
COMPARES = (
    aten.eq.Scalar,
    aten.eq.Tensor,
    aten.ne.Scalar,
    aten.lt.Scalar,
    aten.lt.Tensor,
    aten.le.Scalar,
    aten.gt.Scalar,
    aten.gt.Tensor,
    aten.ge.Scalar,
)

FLOAT = frozenset({torch.float32})
NUMERIC = frozenset({torch.float32, torch.int32})
INTEGRAL = frozenset({torch.int32, torch.bool})
ANY = frozenset({torch.float32, torch.int32, torch.bool})

# PT2E's quantize / dequantize with constant qparams (the frontend's FakeQuantize; weights
# dequantized as arithmetic: convert.py). Delegated only with the ops they quantize.
_qd = torch.ops.quantized_decomposed
QDQ = (
    _qd.quantize_per_tensor.default,
    _qd.dequantize_per_tensor.default,
    _qd.dequantize_per_channel.default,
)
QUANTIZED = frozenset({torch.float32, torch.uint8, torch.int8})

# op -> the dtypes its tensors may have (besides int64 where INT64_* allow it).
DTYPES: dict[torch._ops.OpOverload, frozenset[torch.dtype]] = {
    **dict.fromkeys(PRESERVED, FLOAT),
    **dict.fromkeys(QDQ, QUANTIZED),
    aten.topk.default: FLOAT,
    aten.index.Tensor: ANY,
    # elementwise, unary
    **dict.fromkeys(
        (
            aten.exp.default,
            aten.log.default,
            aten.sqrt.default,
            aten.rsqrt.default,
            aten.reciprocal.default,
            aten.sin.default,
            aten.cos.default,
            aten.tanh.default,
            aten.sigmoid.default,
            aten.gelu.default,
            aten.erf.default,
            aten.floor.default,
            aten.ceil.default,
            aten.clamp.default,
            aten.leaky_relu.default,
            aten.pow.Tensor_Tensor,
            aten.hardtanh.default,
            aten.expm1.default,
            aten.log1p.default,
            aten.div.Tensor_mode,  # floor-division of negative int32 differs
        ),
        FLOAT,
    ),
    **dict.fromkeys(
        (
            aten.abs.default,
            aten.neg.default,
            aten.sign.default,
            aten.relu.default,
            aten.pow.Tensor_Scalar,
            aten.maximum.default,
            aten.minimum.default,
            aten.remainder.Scalar,
        ),
        NUMERIC,
    ),
    # elementwise, binary, comparisons, logic
    **dict.fromkeys(
        (
            aten.add.Tensor,
            aten.add.Scalar,
            aten.sub.Tensor,
            aten.mul.Tensor,
            aten.mul.Scalar,
            aten.div.Tensor,
            aten.div.Scalar,
        ),
        NUMERIC,
    ),
    **dict.fromkeys(
        (
            *COMPARES,
            aten.logical_not.default,
            aten.logical_and.default,
            aten.logical_or.default,
            aten.where.self,
        ),
        ANY,
    ),
    **dict.fromkeys(
        (aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default), INTEGRAL
    ),
    # linear algebra and convolution
    aten.mm.default: NUMERIC,
    aten.bmm.default: FLOAT,
    aten.addmm.default: FLOAT,
    aten.convolution.default: FLOAT,
    # reductions
    aten.sum.dim_IntList: FLOAT,
    aten.mean.dim: FLOAT,
    aten.amax.default: NUMERIC,
    aten.amin.default: NUMERIC,
    aten.argmax.default: NUMERIC,
    aten.argmin.default: NUMERIC,
    aten.max.dim: FLOAT,
    aten.any.dim: ANY,
    aten.var.correction: FLOAT,
    aten.cumsum.default: FLOAT,
    # normalization and softmax
    aten.native_layer_norm.default: FLOAT,
    aten._native_batch_norm_legit_no_training.default: FLOAT,
    aten.native_group_norm.default: FLOAT,
    aten._softmax.default: FLOAT,
    aten._log_softmax.default: FLOAT,
    # pooling and resizing
    aten.avg_pool2d.default: FLOAT,
    aten.max_pool2d_with_indices.default: FLOAT,
    aten._adaptive_avg_pool2d.default: FLOAT,
    aten.upsample_nearest2d.vec: FLOAT,
    aten.upsample_bilinear2d.vec: FLOAT,
    # views, shapes, copies
    **dict.fromkeys((*MOVES, aten.constant_pad_nd.default, aten._to_copy.default), ANY),
    # creation and indexing
    aten.full.default: ANY,
    aten.full_like.default: ANY,
    aten.scalar_tensor.default: ANY,
    aten.arange.start_step: NUMERIC,
    aten.embedding.default: FLOAT,
    aten.index_select.default: ANY,
    aten.gather.default: ANY,
}

INDICES = frozenset({torch.int32, torch.int64})
# Arguments that may have other dtypes than the op's data (op -> position or keyword -> dtypes):
# indices, which may be int64 (their values are bounded by a size), and attention masks.
ARG_DTYPES: dict[torch._ops.OpOverload, dict[int | str, frozenset[torch.dtype]]] = {
    # zero points: int64 buffers of int8 values, dequantized as float (convert.py)
    _qd.dequantize_per_channel.default: {2: frozenset({torch.int64, torch.int32})},
    aten.embedding.default: {1: INDICES, "indices": INDICES},
    aten.index_select.default: {2: INDICES, "index": INDICES},
    aten.gather.default: {2: INDICES, "index": INDICES},
    aten.index.Tensor: {1: INDICES, "indices": INDICES},
    aten.scaled_dot_product_attention.default: {
        3: frozenset({torch.float32, torch.bool}),
        "attn_mask": frozenset({torch.float32, torch.bool}),
    },
}
# Ops whose int64 outputs are indices into (or sizes of) a tensor.
INT64_INDEX_OUTPUTS = frozenset(
    {
        aten.argmax.default,
        aten.argmin.default,
        aten.max.dim,
        aten.max_pool2d_with_indices.default,
        aten.topk.default,
    }
)
# Creation ops that may make int64 tensors from int32-sized literals.
INT64_CREATION = frozenset({aten.arange.start_step, aten.full.default, aten.scalar_tensor.default})
_INT32 = 2**31
# int64 data that OpenVINO's int32 arithmetic computes exactly: every int64 tensor entering a
# segment is checked to lie within +-INT64_LIMIT (weights when compiled or staged, inputs on
# every call: convert.check_int64_weights, the executor), ops that only move or compare
# values keep that bound, and an add or subtract of a literal within +-_STEP widens it by
# _STEP, at most _MAX_STEPS times along any path: 2**30 + 32 * 2**24 < 2**31.
INT64_LIMIT = 2**30
_STEP = 2**24
_MAX_STEPS = 32
INT64_MOVES = frozenset(
    {
        *MOVES,
        aten.gather.default,
        aten.index_select.default,
        aten.index.Tensor,
        aten.where.self,
    }
)
INT64_COMPARES = frozenset(COMPARES)
INT64_ADDS = frozenset({aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor})


def _inputs(node: Node) -> Iterator[tuple[int | str, torch.Tensor]]:
    """(argument position or keyword, fake value) of every tensor the node reads."""
    for key, arg in [*enumerate(node.args), *node.kwargs.items()]:
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            value = item.meta.get("val") if isinstance(item, Node) else None
            if isinstance(value, torch.Tensor):
                yield key, value


def _outputs(node: Node) -> list[torch.Tensor]:
    value = node.meta.get("val")
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _small_literals(node: Node, limit: int = _INT32) -> bool:
    literals = [*node.args, *node.kwargs.values()]
    flat = [x for a in literals for x in (a if isinstance(a, (list, tuple)) else (a,))]
    numbers = [x for x in flat if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return all(-limit <= x < limit for x in numbers)


def _int64_steps(node: Any, memo: dict | None = None, depth: int = 0) -> int | None:
    """For an int64 value: how many literal adds separate it from values checked to lie
    within +-INT64_LIMIT (see INT64_LIMIT); None when OpenVINO could not compute it exactly.

    A value no rule here lets OpenVINO compute (a placeholder, another region's output, an
    op whose int64 output the table refuses, which therefore runs in PyTorch) enters the
    segment as an input, checked on every call: 0."""
    memo = {} if memo is None else memo
    if not isinstance(node, Node) or node.op != "call_function":
        return 0
    if depth > 64:
        return None
    if node in memo:
        return memo[node]
    memo[node] = steps = _steps(node, memo, depth)
    return steps


_DATA_ONLY = {aten.gather.default, aten.index_select.default, aten.index.Tensor}


def _steps(node: Node, memo: dict, depth: int) -> int | None:
    target = node.target
    if target is operator.getitem and isinstance(node.args[0], Node):
        producer = node.args[0]
        if producer.target in INT64_INDEX_OUTPUTS:
            return 0
        return _int64_steps(producer, memo, depth + 1)
    if target in INT64_INDEX_OUTPUTS:
        return 0
    if target in INT64_CREATION:
        return 0 if _small_literals(node, INT64_LIMIT) else None
    if target not in INT64_MOVES and target not in INT64_ADDS:
        return 0  # refused by the table when it makes int64: computed in PyTorch
    # The values moved: a gather's data, not its indices (bounded by a size).
    sources = node.args[:1] if target in _DATA_ONLY else node.all_input_nodes
    tensors = []
    for source in sources:
        value = source.meta.get("val") if isinstance(source, Node) else None
        if not isinstance(value, torch.Tensor) or value.dtype == torch.bool:
            continue
        if value.dtype != torch.int64:
            return None  # int32 promoted to int64 here: not within the bound
        tensors.append(source)
    steps = [_int64_steps(a, memo, depth + 1) for a in tensors]
    if any(s is None for s in steps):
        return None
    most = max(steps, default=0)
    if target in INT64_MOVES:
        return most
    literals = [a for a in node.args[1:] if not isinstance(a, Node)]
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if len(tensors) != 1 or not literals or alpha != 1 or not _small_literals(node, _STEP):
        return None  # two int64 tensors, a scale, or a large literal: could leave int32
    return most + 1 if most + 1 <= _MAX_STEPS else None


def _bounded_int64_data(node: Node) -> bool:
    """The node moves, compares or adds int64 values OpenVINO computes exactly."""
    target = node.target
    if target in INT64_COMPARES:
        tensors = [a for a in node.all_input_nodes if _is_int64(a)]
        bounded = all(_int64_steps(a) is not None for a in tensors)
        return bounded and _small_literals(node, INT64_LIMIT)  # the literal is int32 too
    if target in INT64_MOVES or target in INT64_ADDS:
        return _int64_steps(node) is not None
    return False


def _is_int64(node: Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype == torch.int64


def check_dtypes(node: Node) -> str | None:
    """Every tensor the node reads or writes has a dtype the op runs on in OpenVINO, and
    int64 only where its values stay within int32 (see the module docstring)."""
    allowed = DTYPES[node.target]
    by_arg = ARG_DTYPES.get(node.target, {})
    int64_data = _bounded_int64_data(node)
    for key, value in _inputs(node):
        dtypes = by_arg.get(key, allowed)
        if value.dtype == torch.int64 and int64_data:
            continue
        if value.dtype not in dtypes:
            return _dtype_reason(value.dtype, dtypes)
    for value in _outputs(node):
        if value.dtype == torch.int64 and (
            node.target in INT64_INDEX_OUTPUTS
            or (node.target in INT64_CREATION and _small_literals(node))
            or int64_data
        ):
            continue
        if value.dtype not in allowed:
            return _dtype_reason(value.dtype, allowed)
    return None


def _dtype_reason(dtype: torch.dtype, allowed: frozenset[torch.dtype]) -> str:
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.int64:
        return (
            "int64 values (OpenVINO's CPU plugin computes int64 as int32; int64 may only be "
            "indices, or values moved, compared or offset by small literals)"
        )
    return f"dtype {name} not supported (runs on {sorted(str(d)[6:] for d in allowed)})"


def _first_output_only(node: Node) -> str | None:
    """Only output 0 is read: OpenVINO converts the normalized value, not the statistics."""
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] != 0:
            return "its saved statistics (outputs 1, 2) are read; OpenVINO returns only output 0"
    return None


def _sdpa(node: Node) -> str | None:
    args = dict(zip(("attn_mask", "dropout_p", "is_causal"), node.args[3:], strict=False))
    args.update(node.kwargs)
    if args.get("dropout_p", 0.0):
        return "attention dropout (training) is not supported"
    if args.get("enable_gqa", False):
        return "grouped-query attention (enable_gqa) does not convert"
    return None


def _avg_pool(node: Node) -> str | None:
    divisor = node.args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")
    return "divisor_override does not convert" if divisor is not None else None


def _var(node: Node) -> str | None:
    if node.kwargs.get("correction") is None:
        return "var without an explicit correction (OpenVINO computes the biased variance)"
    return None


def _static_shapes(node: Node) -> str | None:
    source = node.args[0] if node.args else node.kwargs.get("input")
    value = source.meta.get("val") if isinstance(source, Node) else None
    if not isinstance(value, torch.Tensor) or not all(isinstance(d, int) for d in value.shape):
        return "dynamic shapes (the native form needs the batch and channel counts)"
    return None


def _one_index(node: Node) -> str | None:
    indices = node.args[1] if len(node.args) > 1 else node.kwargs.get("indices")
    if not isinstance(indices, (list, tuple)) or len(indices) != 1:
        return "more than one index tensor (only x[idx] is checked)"
    value = indices[0].meta.get("val") if isinstance(indices[0], Node) else None
    if not isinstance(value, torch.Tensor) or value.dtype not in INDICES:
        return "a boolean mask or a missing index (only integer indices are checked)"
    return None


CHECKS = {
    aten.group_norm.default: _static_shapes,
    aten.index.Tensor: _one_index,
    aten.native_layer_norm.default: _first_output_only,
    aten.native_group_norm.default: _first_output_only,
    aten._native_batch_norm_legit_no_training.default: _first_output_only,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.avg_pool2d.default: _avg_pool,
    aten.var.correction: _var,
}


def build_table() -> SupportTable:
    return SupportTable({op: CHECKS.get(op) for op in DTYPES}, every_op=check_dtypes)

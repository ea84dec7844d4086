"""Every op in the onnxruntime support table exports, runs in ORT, and matches eager.

All samples go into one program (one ONNX export instead of ~120) whose every output is
checked; the report shows each table op inside the ORT region, so an op that decomposition
removes or the table refuses fails here by name. Forms of an op that the table refuses (its
checkers) are pinned by reason, and ops known to fail are checked to fail still.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import nativert
from nativert.backend.delegates.onnxruntime import support as onnxruntime_support
from nativert.backend.pipeline import decompose
from tests.conftest import assert_close

aten = torch.ops.aten
pytestmark = pytest.mark.skipif(
    not nativert.get_delegate("onnxruntime").is_available(), reason="onnxruntime missing"
)


def r(*shape):
    return torch.randn(*shape)


def pos(*shape):
    return torch.rand(*shape) + 0.5


def ints(*shape):
    return torch.randint(0, 5, shape)


def bools(*shape):
    return torch.rand(*shape) > 0.5


def below(high, *shape):
    return torch.randint(0, high, shape)


def longs(*values):
    return torch.tensor(values)


def u8(*shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def i8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


qd = torch.ops.quantized_decomposed

# op -> args (tensors become program inputs, the rest stay literal)
SAMPLES = {
    # PT2E's Q/DQ; 0..127 in a uint8 is a narrow range (export.py clamps)
    qd.quantize_per_tensor.default: lambda: (r(3, 4) * 4, 0.05, 3, 0, 127, torch.uint8),
    qd.dequantize_per_tensor.default: lambda: (u8(3, 4), 0.05, 3, 0, 255, torch.uint8),
    qd.quantize_per_channel.default: lambda: (
        r(3, 4),
        pos(4),
        below(5, 4),
        1,
        -128,
        127,
        torch.int8,
    ),
    qd.dequantize_per_channel.default: lambda: (
        i8(4, 3),
        pos(4),
        below(5, 4),
        0,
        -128,
        127,
        torch.int8,
    ),
    aten.linear.default: lambda: (r(2, 3), r(4, 3), r(4)),
    aten.layer_norm.default: lambda: (r(2, 4), [4], r(4), r(4)),
    aten.scaled_dot_product_attention.default: lambda: (
        r(1, 2, 3, 4),
        r(1, 2, 3, 4),
        r(1, 2, 3, 4),
    ),
    aten.group_norm.default: lambda: (r(2, 4, 3), 2, r(4), r(4)),
    aten.abs.default: lambda: (r(3),),
    aten.neg.default: lambda: (r(3),),
    aten.exp.default: lambda: (r(3),),
    aten.log.default: lambda: (pos(3),),
    aten.sqrt.default: lambda: (pos(3),),
    aten.rsqrt.default: lambda: (pos(3),),
    aten.reciprocal.default: lambda: (pos(3),),
    aten.sin.default: lambda: (r(3),),
    aten.cos.default: lambda: (r(3),),
    aten.tanh.default: lambda: (r(3),),
    aten.sigmoid.default: lambda: (r(3),),
    aten.relu.default: lambda: (r(3),),
    aten.gelu.default: lambda: (r(3),),
    aten.erf.default: lambda: (r(3),),
    aten.floor.default: lambda: (r(3) * 3,),
    aten.ceil.default: lambda: (r(3) * 3,),
    aten.sign.default: lambda: (r(3),),
    aten.logical_not.default: lambda: (bools(3),),
    aten.log1p.default: lambda: (pos(3) - 0.9,),
    aten.isnan.default: lambda: (torch.tensor([1.0, float("nan"), float("inf")]),),
    aten.elu.default: lambda: (r(5), 1.6732632423543772, 1.0507009873554805),  # selu's
    aten.clamp.default: lambda: (r(3), -0.5, 0.5),
    aten.clamp.Tensor: lambda: (r(3, 4), r(3, 1) - 0.5, r(4) + 0.5),
    aten.leaky_relu.default: lambda: (r(3), 0.1),
    aten.pow.Tensor_Scalar: lambda: (pos(3), 2.5),
    aten.pow.Tensor_Tensor: lambda: (pos(3), r(3)),
    aten.hardtanh.default: lambda: (r(3), -0.5, 0.5),
    aten.add.Tensor: lambda: (r(3), r(3)),
    aten.add.Scalar: lambda: (r(3), 2.0),
    aten.sub.Tensor: lambda: (r(3), r(3)),
    aten.mul.Tensor: lambda: (r(3), r(3)),
    aten.mul.Scalar: lambda: (r(3), 3.0),
    aten.div.Tensor: lambda: (r(3), pos(3)),
    aten.div.Scalar: lambda: (r(3), 4.0),
    aten.maximum.default: lambda: (r(3), r(3)),
    aten.minimum.default: lambda: (r(3), r(3)),
    aten.eq.Scalar: lambda: (ints(3), 2),
    aten.eq.Tensor: lambda: (ints(3), ints(3)),
    aten.ne.Scalar: lambda: (ints(3), 2),
    aten.lt.Scalar: lambda: (r(3), 0.0),
    aten.lt.Tensor: lambda: (r(3), r(3)),
    aten.le.Scalar: lambda: (r(3), 0.0),
    aten.le.Tensor: lambda: (ints(2, 1, 3), ints(1, 4, 1)),
    aten.gt.Scalar: lambda: (r(3), 0.0),
    aten.gt.Tensor: lambda: (r(3), r(3)),
    aten.ge.Scalar: lambda: (r(3), 0.0),
    aten.ge.Tensor: lambda: (ints(3, 4), r(4) * 3),
    aten.logical_and.default: lambda: (bools(3), bools(3)),
    aten.logical_or.default: lambda: (bools(3), bools(3)),
    aten.bitwise_and.Tensor: lambda: (bools(3), bools(3)),
    aten.bitwise_or.Tensor: lambda: (bools(3), bools(3)),
    aten.bitwise_not.default: lambda: (bools(3),),
    aten.where.self: lambda: (bools(3), r(3), r(3)),
    aten.mm.default: lambda: (r(2, 3), r(3, 4)),
    aten.bmm.default: lambda: (r(2, 2, 3), r(2, 3, 4)),
    aten.addmm.default: lambda: (r(4), r(2, 3), r(3, 4)),
    aten.convolution.default: lambda: (
        r(1, 2, 5, 5),
        r(3, 2, 3, 3),
        r(3),
        [1, 1],
        [1, 1],
        [1, 1],
        False,
        [0, 0],
        1,
    ),
    aten.sum.dim_IntList: lambda: (r(2, 3), [1]),
    aten.mean.dim: lambda: (r(2, 3), [0], True),
    aten.mean.default: lambda: (r(2, 3),),
    aten.amax.default: lambda: (r(2, 3), [1]),
    aten.amin.default: lambda: (r(2, 3), [1]),
    aten.argmax.default: lambda: (r(2, 3), 1),
    aten.any.dim: lambda: (bools(2, 3), 1),
    aten.var.correction: lambda: (r(2, 5), [1]),
    aten.var_mean.correction: lambda: (r(3, 5, 2), [0, 2]),
    # what transformers' masks do: positions from a boolean mask, int64 out
    aten.cumsum.default: lambda: (bools(2, 6), -1),
    aten.linalg_vector_norm.default: lambda: (r(3, 4), 2, [1], True),
    aten.native_layer_norm.default: lambda: (r(2, 4), [4], r(4), r(4), 1e-5),
    aten._native_batch_norm_legit_no_training.default: lambda: (
        r(2, 3, 4),
        r(3),
        r(3),
        r(3),
        pos(3),
        0.1,
        1e-5,
    ),
    # what InstanceNorm2d leaves: statistics of the input itself, all three outputs
    aten._native_batch_norm_legit.no_stats: lambda: (r(2, 3, 4, 4), r(3), r(3), True, 0.1, 1e-5),
    aten.native_group_norm.default: lambda: (r(2, 4, 3), r(4), r(4), 2, 4, 3, 2, 1e-5),
    aten._softmax.default: lambda: (r(2, 3), 1, False),
    aten._log_softmax.default: lambda: (r(2, 3), 1, False),
    aten.avg_pool2d.default: lambda: (r(1, 2, 4, 4), [2, 2]),
    aten.avg_pool3d.default: lambda: (
        r(1, 2, 6, 6, 6),
        [3, 3, 3],
        [2, 2, 2],
        [1, 1, 1],
        True,  # ceil_mode
        False,  # count_include_pad
    ),
    aten.max_pool2d_with_indices.default: lambda: (r(1, 2, 4, 4), [2, 2]),
    aten.max_pool3d_with_indices.default: lambda: (
        r(1, 2, 7, 7, 7),
        [3, 3, 3],
        [2, 2, 2],
        [1, 1, 1],
        [1, 1, 1],
        True,
    ),
    aten._adaptive_avg_pool2d.default: lambda: (r(1, 2, 7, 9), [3, 5]),  # uneven windows
    aten.adaptive_max_pool2d.default: lambda: (r(1, 2, 6, 6), [3, 2]),
    aten.adaptive_max_pool3d.default: lambda: (r(1, 2, 4, 4, 4), [2, 2, 1]),
    # fractional scale factors: torch maps coordinates with the scales, not in/out sizes
    aten.upsample_bilinear2d.vec: lambda: (r(1, 2, 5, 9), None, False, [1.7, 0.6]),
    aten.upsample_nearest2d.vec: lambda: (r(1, 2, 5, 5), None, [1.7, 1.7]),
    aten.upsample_nearest2d.default: lambda: (r(1, 2, 3, 4), [5, 7]),
    aten.view.default: lambda: (r(2, 6), [3, 4]),
    aten.permute.default: lambda: (r(2, 3, 4), [2, 0, 1]),
    aten.expand.default: lambda: (r(1, 3), [4, 3]),
    aten.slice.Tensor: lambda: (r(5, 3), 0, 1, 4),
    aten.select.int: lambda: (r(5, 3), 0, 2),
    aten.unsqueeze.default: lambda: (r(3), 0),
    aten.squeeze.dims: lambda: (r(1, 3, 1), [0, 2]),
    aten.cat.default: lambda: ([r(2, 3), r(1, 3)], 0),
    aten.split_with_sizes.default: lambda: (r(5, 2), [2, 3]),
    # overlapping windows from an offset (convnext's is the identity restride of a mean)
    aten.as_strided.default: lambda: (r(12), [4, 3], [2, 1], 1),
    aten.repeat.default: lambda: (r(2, 3), [2, 1, 2]),
    aten.clone.default: lambda: (r(3),),
    aten.copy.default: lambda: (r(3, 4), ints(3, 4)),  # into float from int64
    aten._to_copy.default: lambda: (r(3),),
    aten.alias.default: lambda: (r(3),),
    aten.constant_pad_nd.default: lambda: (r(2, 3), [1, 1], 0.5),
    aten.slice_scatter.default: lambda: (r(5, 6), r(5, 2), 1, 1, 5, 2),
    aten.full.default: lambda: ([2, 3], 1.5),
    aten.full_like.default: lambda: (r(2, 3), 7.0),
    aten.arange.start_step: lambda: (0, 10, 2),
    aten.empty.memory_format: lambda: ([2, 3],),
    aten.embedding.default: lambda: (r(10, 4), ints(2, 3)),
    aten.index_select.default: lambda: (r(5, 3), 0, ints(4)),
    aten.gather.default: lambda: (r(3, 4), 1, torch.randint(0, 4, (3, 2))),
    # a kept dimension (None), two index tensors that broadcast, negative indices
    aten.index.Tensor: lambda: (r(4, 5, 6), [None, longs([0, 2], [-1, 1]), longs(1, -2)]),
    aten.scalar_tensor.default: lambda: (2.5,),
    # 2 layers, bidirectional, batch first: input, (h0, c0), 2 x 2 x (w_ih, w_hh, b_ih, b_hh)
    aten.lstm.input: lambda: (
        r(3, 5, 4),
        [r(4, 3, 6), r(4, 3, 6)],
        [r(24, 4), r(24, 6), r(24), r(24)] * 2 + [r(24, 12), r(24, 6), r(24), r(24)] * 2,
        True,
        2,
        0.0,
        False,
        True,
        True,
    ),
}
KWARGS = {
    aten._to_copy.default: {"dtype": torch.float64},
    aten.var_mean.correction: {"correction": 0, "keepdim": True},
}
# Outputs compared: eval-mode batch norm's saved statistics are empty in torch and
# per-channel in ORT; graphs only ever read its output 0.
PICK = {aten._native_batch_norm_legit_no_training.default: 0}
# Applied to the output before it is compared: empty's values are unspecified.
THEN = {aten.empty.memory_format: lambda out: aten.full_like.default(out, 3.0)}
# Further forms that real models use, run in the same program: (op, args, kwargs).
MORE_FORMS = [
    # transformers' attention masks: two broadcasting int64 indices into a bool mask
    (aten.index.Tensor, lambda: (bools(2, 6), [below(2, 2, 1, 1, 1), below(6, 1, 1, 6, 1)]), {}),
    (aten.index.Tensor, lambda: (r(5, 3), [longs(-1, 0, 4)]), {}),
    (aten.cumsum.default, lambda: (r(3, 5), 1), {"dtype": torch.float64}),
    (aten.upsample_bilinear2d.vec, lambda: (r(1, 2, 3, 4), [5, 7], True, None), {}),
    (aten.upsample_bilinear2d.vec, lambda: (r(1, 2, 8, 9), [3, 4], False, None), {}),
    (aten.clamp.Tensor, lambda: (r(3, 4), None, r(4)), {}),
    (aten.linalg_vector_norm.default, lambda: (r(3, 4), float("inf"), [0]), {}),
    # convnext's: after the global mean, a restride that keeps every value in place
    (aten.as_strided.default, lambda: (r(1, 4, 1, 1), [1, 4, 1, 1], [4, 1, 4, 4]), {}),
]


def test_every_table_op_has_a_sample():
    table = onnxruntime_support.build_table()
    assert sorted(map(str, table.ops())) == sorted(map(str, SAMPLES)), (
        "give every op in the onnxruntime table a sample here, and only those"
    )


def test_every_table_op_is_in_the_exporters_registry():
    table = set(onnxruntime_support.build_table().ops())
    missing = table - onnxruntime_support.exporter_ops()
    assert not missing, f"torch.onnx cannot export {sorted(map(str, missing))}: drop them"


HOLE = object()  # where a tensor argument goes (None is an argument: index's kept dims)


def _program_of(calls):
    """One module running every (op, make_args, kwargs) call; (module, inputs). Tensor
    arguments become inputs (ORT must not fold them); everything else stays literal."""
    inputs, specs = [], []
    for _, make, _ in calls:
        leaves, spec = pytree.tree_flatten(make())
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        literal = [HOLE if isinstance(x, torch.Tensor) else x for x in leaves]
        inputs.extend(tensors)
        specs.append((len(tensors), literal, spec))

    class Module(torch.nn.Module):
        def forward(self, *tensors):
            outs, start = [], 0
            for (op, _, kwargs), (n, literal, spec) in zip(calls, specs, strict=True):
                it = iter(tensors[start : start + n])
                start += n
                args = pytree.tree_unflatten([next(it) if x is HOLE else x for x in literal], spec)
                out = op(*args, **kwargs)
                out = out[PICK[op]] if op in PICK else out
                outs.append(THEN[op](out) if op in THEN else out)
            return tuple(outs)

    return Module(), tuple(inputs)


def test_every_table_op_exports_and_runs_in_ort():
    torch.manual_seed(0)
    ops = sorted(SAMPLES, key=str)
    calls = [(op, SAMPLES[op], KWARGS.get(op, {})) for op in ops] + MORE_FORMS
    model, inputs = _program_of(calls)
    program = nativert.to_backend(
        torch.export.export(model, inputs),
        nativert.AllNodePartitioner("onnxruntime"),
        passes=[],
    )
    report = nativert.delegation_report(program)
    missing = [str(op) for op in ops if report.ops.get(str(op), {}).get("onnxruntime", 0) == 0]
    assert missing == [], f"table ops not delegated to onnxruntime: {missing}\n{report}"
    with torch.no_grad():
        got, expected = program.module()(*inputs), model(*inputs)
    for (op, _, _), a, e in zip(calls, got, expected, strict=True):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what=str(op))


def test_lstm_is_one_ort_op_but_not_with_training_dropout():
    torch.manual_seed(0)
    model = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True).eval()
    x = r(2, 5, 4)
    program = nativert.to_backend(torch.export.export(model, (x,)))
    report = nativert.delegation_report(program)
    assert report.ops["aten.lstm.input"] == {"onnxruntime": 1}
    with torch.no_grad():
        assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-4)

    table = onnxruntime_support.build_table()
    train = torch.nn.LSTM(4, 6, num_layers=2, dropout=0.5, batch_first=True).train()
    graph = torch.export.export(train, (x,)).graph
    (node,) = [n for n in graph.nodes if n.target is torch.ops.aten.lstm.input]
    assert "dropout in training mode" in table.check(node)


def _call(op, *args, **kwargs):
    """A module that calls `op` on its inputs, then the literal `args`."""

    class Call(torch.nn.Module):
        def forward(self, *tensors):
            return op(*tensors, *args, **kwargs)

    return Call()


class Index(torch.nn.Module):
    """x[x > 0] without a dtype, else x indexed by a tensor of that dtype."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        if self.dtype is None:
            return x[x > 0]
        return x[torch.tensor([2, 0], dtype=self.dtype)]


class Restride(torch.nn.Module):
    """as_strided of x's transpose, or of its first `rows` rows."""

    def __init__(self, size, stride, *, transpose=False, rows=None) -> None:
        super().__init__()
        self.size, self.stride, self.transpose, self.rows = size, stride, transpose, rows

    def forward(self, x):
        x = x * 2
        x = x.t() if self.transpose else x[: self.rows]
        return aten.as_strided.default(x, self.size, self.stride)


# (form, () -> (module, inputs), the op, words of the table's reason)
REFUSED = [
    ("boolean mask", lambda: (Index(), (r(3, 4),)), aten.index.Tensor, "boolean mask"),
    ("int32 indices", lambda: (Index(torch.int32), (r(3, 4),)), aten.index.Tensor, "int32"),
    (
        "copy that broadcasts",
        lambda: (_call(aten.copy.default), (r(3, 4), r(4))),
        aten.copy.default,
        "broadcasts its source",
    ),
    (
        "as_strided of a transpose",
        lambda: (Restride([4, 3], [3, 1], transpose=True), (r(3, 4),)),
        aten.as_strided.default,
        "non-contiguous",
    ),
    (
        "as_strided past its input",
        lambda: (Restride([2, 4], [4, 1], rows=1), (r(3, 4),)),
        aten.as_strided.default,
        "outside its input",
    ),
    (
        "avg_pool2d divisor_override",
        lambda: (
            _call(aten.avg_pool2d.default, [2, 2], [2, 2], [0, 0], False, True, 3),
            (r(1, 2, 4, 4),),
        ),
        aten.avg_pool2d.default,
        "divisor_override",
    ),
    (
        "adaptive max pool, uneven windows",
        lambda: (_call(aten.adaptive_max_pool2d.default, [4, 4]), (r(1, 2, 6, 6),)),
        aten.adaptive_max_pool2d.default,
        "divide evenly",
    ),
    (
        "elu input_scale",
        lambda: (_call(aten.elu.default, 1.0, 1.0, 2.0), (r(4),)),
        aten.elu.default,
        "input_scale",
    ),
    (
        "elu float64",
        lambda: (_call(aten.elu.default), (r(4).double(),)),
        aten.elu.default,
        "dtype float64",
    ),
    (
        "isnan of int64",
        lambda: (_call(aten.isnan.default), (ints(4),)),
        aten.isnan.default,
        "int64 input",
    ),
    (
        "cumsum float16",
        lambda: (_call(aten.cumsum.default, 0), (r(4).half(),)),
        aten.cumsum.default,
        "dtype float16",
    ),
    (
        "instance norm float64",
        lambda: (torch.nn.InstanceNorm2d(3), (r(2, 3, 4, 4).double(),)),
        aten._native_batch_norm_legit.no_stats,
        "dtype float64",
    ),
]


@pytest.mark.parametrize(
    ("make", "op", "reason"),
    [case[1:] for case in REFUSED],
    ids=[case[0] for case in REFUSED],
)
def test_table_refuses_forms_it_cannot_run(make, op, reason):
    model, inputs = make()
    program = decompose(
        torch.export.export(model.eval(), inputs),
        frozenset(onnxruntime_support.PRESERVED),
    )
    (node,) = [n for n in program.graph.nodes if n.target is op]
    assert reason in (onnxruntime_support.build_table().check(node) or "supported")


def test_table_refuses_upsampling_with_dynamic_shapes():
    class Resize(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear")

    dims = {0: torch.export.Dim("batch", min=2, max=8)}
    ep = torch.export.export(Resize(), (r(2, 3, 4, 4),), dynamic_shapes=(dims,))
    program = decompose(ep, frozenset(onnxruntime_support.PRESERVED))
    (node,) = [n for n in program.graph.nodes if n.target is aten.upsample_bilinear2d.vec]
    assert "dynamic shapes" in onnxruntime_support.build_table().check(node)


KNOWN_FAILURE_SAMPLES = {
    aten._adaptive_avg_pool3d.default: lambda: (r(1, 2, 4, 4, 4), [2, 2, 2]),
    aten.empty_permuted.default: lambda: ([2, 3], [1, 0]),
}


@pytest.mark.parametrize("op", sorted(onnxruntime_support.KNOWN_FAILURES, key=str), ids=str)
def test_known_failures_still_fail(op):
    model, inputs = _program_of([(op, KNOWN_FAILURE_SAMPLES[op], {})])
    program = torch.export.export(model, inputs).run_decompositions()
    assert any(n.target is op for n in program.graph.nodes)
    delegate = nativert.get_delegate("onnxruntime")
    with pytest.raises(nativert.DelegateCompileError, match="No ONNX function found"):
        delegate.preprocess(program, [])

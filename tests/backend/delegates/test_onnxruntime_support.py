"""Every op in the onnxruntime support table exports, runs in ORT, and matches eager.

All samples go into one program (one ONNX export instead of ~90) whose every output is
checked; the report shows each table op inside the ORT region, so an op that decomposition
removes or the table refuses fails here by name.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import nativert
from nativert.backend.delegates.onnxruntime import support as onnxruntime_support
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


# op -> args (tensors become program inputs, the rest stay literal)
SAMPLES = {
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
    aten.clamp.default: lambda: (r(3), -0.5, 0.5),
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
    aten.gt.Scalar: lambda: (r(3), 0.0),
    aten.gt.Tensor: lambda: (r(3), r(3)),
    aten.ge.Scalar: lambda: (r(3), 0.0),
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
    aten.amax.default: lambda: (r(2, 3), [1]),
    aten.amin.default: lambda: (r(2, 3), [1]),
    aten.argmax.default: lambda: (r(2, 3), 1),
    aten.any.dim: lambda: (bools(2, 3), 1),
    aten.var.correction: lambda: (r(2, 5), [1]),
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
    aten.native_group_norm.default: lambda: (r(2, 4, 3), r(4), r(4), 2, 4, 3, 2, 1e-5),
    aten._softmax.default: lambda: (r(2, 3), 1, False),
    aten._log_softmax.default: lambda: (r(2, 3), 1, False),
    aten.avg_pool2d.default: lambda: (r(1, 2, 4, 4), [2, 2]),
    aten.max_pool2d_with_indices.default: lambda: (r(1, 2, 4, 4), [2, 2]),
    aten.view.default: lambda: (r(2, 6), [3, 4]),
    aten.permute.default: lambda: (r(2, 3, 4), [2, 0, 1]),
    aten.expand.default: lambda: (r(1, 3), [4, 3]),
    aten.slice.Tensor: lambda: (r(5, 3), 0, 1, 4),
    aten.select.int: lambda: (r(5, 3), 0, 2),
    aten.unsqueeze.default: lambda: (r(3), 0),
    aten.squeeze.dims: lambda: (r(1, 3, 1), [0, 2]),
    aten.cat.default: lambda: ([r(2, 3), r(1, 3)], 0),
    aten.split_with_sizes.default: lambda: (r(5, 2), [2, 3]),
    aten.clone.default: lambda: (r(3),),
    aten._to_copy.default: lambda: (r(3),),
    aten.alias.default: lambda: (r(3),),
    aten.constant_pad_nd.default: lambda: (r(2, 3), [1, 1], 0.5),
    aten.full.default: lambda: ([2, 3], 1.5),
    aten.full_like.default: lambda: (r(2, 3), 7.0),
    aten.arange.start_step: lambda: (0, 10, 2),
    aten.embedding.default: lambda: (r(10, 4), ints(2, 3)),
    aten.index_select.default: lambda: (r(5, 3), 0, ints(4)),
    aten.gather.default: lambda: (r(3, 4), 1, torch.randint(0, 4, (3, 2))),
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
KWARGS = {aten._to_copy.default: {"dtype": torch.float64}}
# Outputs compared: eval-mode batch norm's saved statistics are empty in torch and
# per-channel in ORT; graphs only ever read its output 0.
PICK = {aten._native_batch_norm_legit_no_training.default: 0}


def test_every_table_op_has_a_sample():
    table = onnxruntime_support.build_table()
    assert sorted(map(str, table.ops())) == sorted(map(str, SAMPLES)), (
        "give every op in the onnxruntime table a sample here, and only those"
    )


def test_every_table_op_is_in_the_exporters_registry():
    table = set(onnxruntime_support.build_table().ops())
    missing = table - onnxruntime_support.exporter_ops()
    assert not missing, f"torch.onnx cannot export {sorted(map(str, missing))}: drop them"


def test_every_table_op_exports_and_runs_in_ort():
    torch.manual_seed(0)
    ops = sorted(SAMPLES, key=str)
    inputs, specs = [], []
    for op in ops:
        args = SAMPLES[op]()
        # Tensors become inputs (ORT must not fold them); everything else stays literal.
        leaves, spec = pytree.tree_flatten(args)
        tensor_leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
        literal = [None if isinstance(x, torch.Tensor) else x for x in leaves]

        def rebuild(values, literal=literal, spec=spec):
            it = iter(values)
            return pytree.tree_unflatten([next(it) if x is None else x for x in literal], spec)

        inputs.extend(tensor_leaves)
        specs.append((len(tensor_leaves), rebuild))

    class Module(torch.nn.Module):
        def forward(self, *tensors):
            outs, start = [], 0
            for op, (n, rebuild) in zip(ops, specs, strict=True):
                args = rebuild(tensors[start : start + n])
                start += n
                out = op(*args, **KWARGS.get(op, {}))
                outs.append(out[PICK[op]] if op in PICK else out)
            return tuple(outs)

    model = Module()
    program = nativert.to_backend(
        torch.export.export(model, tuple(inputs)),
        nativert.AllNodePartitioner("onnxruntime"),
        passes=[],
    )
    report = nativert.delegation_report(program)
    missing = [str(op) for op in ops if report.ops.get(str(op), {}).get("onnxruntime", 0) == 0]
    assert missing == [], f"table ops not delegated to onnxruntime: {missing}\n{report}"
    with torch.no_grad():
        assert_close(program.module()(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


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

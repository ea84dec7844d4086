"""The openvino delegate, for real: its support table op by op and dtype by dtype, dynamic
shapes, the weight life cycle, untrusted payloads, and whole models through the Executor.

Tolerances: float32 results within atol 1e-5 / rtol 1e-4 of eager (OpenVINO fuses and
reorders float math, e.g. in softmax and normalization); int32, int64 and bool results equal.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim

import nativert
from nativert.backend.delegates.openvino import OpenVinoDelegate, support
from nativert.backend.delegates.openvino import payload as ir
from nativert.models import build
from nativert.partitioner.base import REASON_KEY
from tests.conftest import assert_close

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(
    not OpenVinoDelegate().is_available(), reason=OpenVinoDelegate().is_available().reason
)
aten = torch.ops.aten
OPENVINO = nativert.AllNodePartitioner("openvino")
FLOAT32 = {"atol": 1e-5, "rtol": 1e-4}


class Make:
    """Random tensors of one dtype: the dtype under test."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, *shape: int) -> torch.Tensor:
        if self.dtype == torch.bool:
            return torch.rand(*shape) > 0.5
        if self.dtype == torch.int32:
            return torch.randint(-4, 5, shape, dtype=torch.int32)
        return torch.randn(*shape)


def r(*shape):
    return torch.randn(*shape)


def pos(*shape):
    return torch.rand(*shape) + 0.5


def idx(high, *shape):
    return torch.randint(0, high, shape)


def mask(*shape):
    return torch.rand(*shape) > 0.5


qd = torch.ops.quantized_decomposed

# op -> sample args from a Make of the dtype under test (tensors become program inputs).
SAMPLES = {
    # PT2E's Q/DQ (float32 <-> uint8/int8 whatever the dtype under test)
    qd.quantize_per_tensor.default: lambda t: (r(3, 4) * 4, 0.05, 3, 0, 127, torch.uint8),
    qd.dequantize_per_tensor.default: lambda t: (
        torch.randint(0, 256, (3, 4), dtype=torch.uint8),
        0.05,
        3,
        0,
        255,
        torch.uint8,
    ),
    qd.dequantize_per_channel.default: lambda t: (
        torch.randint(-128, 128, (4, 3), dtype=torch.int8),
        pos(4),
        idx(5, 4),
        0,
        -128,
        127,
        torch.int8,
    ),
    aten.linear.default: lambda t: (t(2, 3), r(4, 3), r(4)),
    aten.scaled_dot_product_attention.default: lambda t: (
        t(1, 2, 3, 4),
        r(1, 2, 5, 4),
        r(1, 2, 5, 4),
        mask(1, 1, 3, 5),
    ),
    aten.exp.default: lambda t: (t(3),),
    aten.log.default: lambda t: (pos(3),),
    aten.sqrt.default: lambda t: (pos(3),),
    aten.rsqrt.default: lambda t: (pos(3),),
    aten.reciprocal.default: lambda t: (pos(3),),
    aten.sin.default: lambda t: (t(3),),
    aten.cos.default: lambda t: (t(3),),
    aten.tanh.default: lambda t: (t(3),),
    aten.sigmoid.default: lambda t: (t(3),),
    aten.gelu.default: lambda t: (t(3),),
    aten.erf.default: lambda t: (t(3),),
    aten.floor.default: lambda t: (t(3) * 3,),
    aten.ceil.default: lambda t: (t(3) * 3,),
    aten.clamp.default: lambda t: (t(3), -0.5, 0.5),
    aten.leaky_relu.default: lambda t: (t(3), 0.1),
    aten.pow.Tensor_Tensor: lambda t: (pos(3), t(3)),
    aten.hardtanh.default: lambda t: (t(3), -0.5, 0.5),
    aten.expm1.default: lambda t: (t(3) * 1e-3,),
    aten.log1p.default: lambda t: (pos(3) * 1e-4,),
    aten.div.Tensor_mode: lambda t: (t(4) * 4, pos(4)),
    aten.abs.default: lambda t: (t(3),),
    aten.neg.default: lambda t: (t(3),),
    aten.sign.default: lambda t: (t(3),),
    aten.relu.default: lambda t: (t(3),),
    aten.pow.Tensor_Scalar: lambda t: (t(3), 2),
    aten.maximum.default: lambda t: (t(3), t(3)),
    aten.minimum.default: lambda t: (t(3), t(3)),
    aten.remainder.Scalar: lambda t: (t(4) * 3, 3),
    aten.add.Tensor: lambda t: (t(3), t(3)),
    aten.add.Scalar: lambda t: (t(3), 2),
    aten.sub.Tensor: lambda t: (t(3), t(3)),
    aten.mul.Tensor: lambda t: (t(3), t(3)),
    aten.mul.Scalar: lambda t: (t(3), 3),
    aten.div.Tensor: lambda t: (t(3), t(3).abs() + 1),
    aten.div.Scalar: lambda t: (t(3), 4),
    aten.eq.Scalar: lambda t: (t(4), 1),
    aten.eq.Tensor: lambda t: (t(4), t(4)),
    aten.ne.Scalar: lambda t: (t(4), 1),
    aten.lt.Scalar: lambda t: (t(4), 0),
    aten.lt.Tensor: lambda t: (t(4), t(4)),
    aten.le.Scalar: lambda t: (t(4), 0),
    aten.gt.Scalar: lambda t: (t(4), 0),
    aten.gt.Tensor: lambda t: (t(4), t(4)),
    aten.ge.Scalar: lambda t: (t(4), 0),
    aten.logical_not.default: lambda t: (t(4),),
    aten.logical_and.default: lambda t: (t(4), t(4)),
    aten.logical_or.default: lambda t: (t(4), t(4)),
    aten.where.self: lambda t: (mask(4), t(4), t(4)),
    aten.bitwise_and.Tensor: lambda t: (t(4), t(4)),
    aten.bitwise_or.Tensor: lambda t: (t(4), t(4)),
    aten.bitwise_not.default: lambda t: (t(4),),
    aten.mm.default: lambda t: (t(2, 3), t(3, 4)),
    aten.bmm.default: lambda t: (t(2, 2, 3), t(2, 3, 4)),
    aten.addmm.default: lambda t: (t(4), t(2, 3), t(3, 4)),
    aten.convolution.default: lambda t: (
        t(1, 4, 7, 7),
        r(6, 2, 3, 3),
        r(6),
        [2, 2],
        [1, 1],
        [1, 1],
        False,
        [0, 0],
        2,
    ),
    aten.sum.dim_IntList: lambda t: (t(2, 3), [1]),
    aten.mean.dim: lambda t: (t(2, 3), [0], True),
    aten.amax.default: lambda t: (t(2, 3), [1]),
    aten.amin.default: lambda t: (t(2, 3), [1]),
    aten.argmax.default: lambda t: (t(2, 5) * 100, 1),  # * 100: no ties
    aten.argmin.default: lambda t: (t(2, 5) * 100, 1),
    aten.max.dim: lambda t: (t(2, 5), 1),
    aten.any.dim: lambda t: (t(2, 3), 1),
    aten.var.correction: lambda t: (t(2, 5), [1]),
    aten.cumsum.default: lambda t: (t(2, 5), 1),
    aten.native_layer_norm.default: lambda t: (t(2, 4), [4], r(4), r(4), 1e-5),
    aten.layer_norm.default: lambda t: (t(2, 4), [4], r(4), r(4), 1e-5),
    aten.group_norm.default: lambda t: (t(2, 4, 3), 2, r(4), r(4), 1e-5),
    aten.topk.default: lambda t: (t(2, 7), 3),
    aten.index.Tensor: lambda t: (t(5, 3), [idx(5, 4)]),
    aten._native_batch_norm_legit_no_training.default: lambda t: (
        t(2, 3, 4),
        r(3),
        r(3),
        r(3),
        pos(3),
        0.1,
        1e-5,
    ),
    aten.native_group_norm.default: lambda t: (t(2, 4, 3), r(4), r(4), 2, 4, 3, 2, 1e-5),
    aten._softmax.default: lambda t: (t(2, 3), 1, False),
    aten._log_softmax.default: lambda t: (t(2, 3), 1, False),
    aten.avg_pool2d.default: lambda t: (t(1, 2, 7, 7), [3, 3], [2, 2], [1, 1], True, False),
    aten.max_pool2d_with_indices.default: lambda t: (t(1, 2, 9, 9), [3, 3], [2, 2], [1, 1]),
    aten._adaptive_avg_pool2d.default: lambda t: (t(1, 2, 7, 9), [3, 4]),
    aten.upsample_nearest2d.vec: lambda t: (t(1, 2, 3, 4), [5, 7], None),
    aten.upsample_bilinear2d.vec: lambda t: (t(1, 2, 3, 4), [5, 7], True, None),
    aten.view.default: lambda t: (t(2, 6), [3, 4]),
    aten.permute.default: lambda t: (t(2, 3, 4), [2, 0, 1]),
    aten.expand.default: lambda t: (t(1, 3), [4, 3]),
    aten.slice.Tensor: lambda t: (t(5, 3), 0, 1, 4),
    aten.select.int: lambda t: (t(5, 3), 0, 2),
    aten.unsqueeze.default: lambda t: (t(3), 0),
    aten.squeeze.dims: lambda t: (t(1, 3, 1), [0, 2]),
    aten.cat.default: lambda t: ([t(2, 3), t(1, 3)], 0),
    aten.split_with_sizes.default: lambda t: (t(5, 2), [2, 3]),
    aten.clone.default: lambda t: (t(3),),
    aten.alias.default: lambda t: (t(3),),
    aten.constant_pad_nd.default: lambda t: (t(2, 3), [1, 1], 0),
    aten._to_copy.default: lambda t: (t(3),),
    aten.full.default: lambda t: ([2, 3], 1),
    aten.full_like.default: lambda t: (t(2, 3), 1),
    aten.scalar_tensor.default: lambda t: (1,),
    aten.arange.start_step: lambda t: (0, 10, 3),
    aten.embedding.default: lambda t: (r(10, 4), idx(10, 2, 3)),
    aten.index_select.default: lambda t: (t(5, 3), 0, idx(5, 4)),
    aten.gather.default: lambda t: (t(3, 4), 1, idx(4, 3, 2)),
}
KWARGS = {
    # the dtype under test, or (for _to_copy) a conversion away from it
    aten._to_copy.default: lambda t: {
        "dtype": torch.int32 if t.dtype == torch.float32 else torch.float32
    },
    aten.full.default: lambda t: {"dtype": t.dtype},
    aten.scalar_tensor.default: lambda t: {"dtype": t.dtype},
    aten.arange.start_step: lambda t: {"dtype": t.dtype},
    aten.var.correction: lambda t: {"correction": 1},
    aten.div.Tensor_mode: lambda t: {"rounding_mode": "floor"},
}
PICK = {  # graphs read only output 0 of these (the table refuses the rest)
    aten.native_layer_norm.default: 0,
    aten._native_batch_norm_legit_no_training.default: 0,
    aten.native_group_norm.default: 0,
}
HOLE = object()


def _program_of(samples, t):
    """One program running every sample on tensors of t's dtype; (model, inputs)."""
    inputs, calls = [], []
    for op, make in samples:
        leaves, spec = pytree.tree_flatten(make(t))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        literal = [HOLE if isinstance(x, torch.Tensor) else x for x in leaves]
        inputs.extend(tensors)
        calls.append((op, len(tensors), literal, spec, KWARGS[op](t) if op in KWARGS else {}))

    class Module(nn.Module):
        def forward(self, *tensors):
            outs, start = [], 0
            for op, n, literal, spec, kwargs in calls:
                it = iter(tensors[start : start + n])
                start += n
                args = pytree.tree_unflatten([next(it) if x is HOLE else x for x in literal], spec)
                out = op(*args, **kwargs)
                outs.append(out[PICK[op]] if op in PICK else out)
            return tuple(outs)

    return Module(), tuple(inputs)


def test_every_table_op_has_a_sample():
    assert sorted(map(str, support.build_table().ops())) == sorted(map(str, SAMPLES))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.bool])
def test_every_table_op_runs_on_every_dtype_it_allows(dtype):
    torch.manual_seed(0)
    ops = sorted((op for op in SAMPLES if dtype in support.DTYPES[op]), key=str)
    model, inputs = _program_of([(op, SAMPLES[op]) for op in ops], Make(dtype))
    program = nativert.to_backend(torch.export.export(model, inputs), OPENVINO, passes=[])
    report = nativert.delegation_report(program)
    missing = [str(op) for op in ops if report.ops.get(str(op), {}).get("openvino", 0) == 0]
    assert missing == [], f"{dtype} table ops not delegated to openvino: {missing}\n{report}"
    (segment,) = nativert.lowered_modules(program)
    OpenVinoDelegate().check_payload(segment.processed_bytes)  # an IR of every op: data
    with torch.no_grad():
        got, expected = program.module()(*inputs), model(*inputs)
    for op, a, e in zip(ops, got, expected, strict=True):
        assert_close(a, e, what=str(op), **FLOAT32)


def test_int64_only_as_indices():
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(50, 8)
            self.positions = nn.Embedding(16, 8)

        def forward(self, ids: torch.Tensor):
            where = torch.arange(ids.shape[1])  # int64, bounded by a size
            h = self.tokens(ids) + self.positions(where)
            return h, h.argmax(dim=-1), ids + 2**40  # the last: int64 data

    model, ids = Positions().eval(), idx(50, 2, 7)
    program = nativert.to_backend(
        torch.export.export(model, (ids,)), delegates=["openvino"], compare_with_pytorch=False
    )
    report = nativert.delegation_report(program)
    assert report.ops["aten.add.Tensor"] == {"openvino": 1, "pytorch": 1}
    add = next(n for n in program.graph.nodes if n.target is aten.add.Tensor)
    assert "computes int64 as int32" in add.meta[REASON_KEY]
    with torch.no_grad():
        assert_close(program.module()(ids), model(ids))


class Positions(nn.Module):
    """Position and token-type ids as transformers compute them: int64 buffers sliced,
    gathered, offset by a literal, compared."""

    def __init__(self, largest: int = 31) -> None:
        super().__init__()
        self.register_buffer("position_ids", torch.arange(32).unsqueeze(0) * (largest // 31))
        self.register_buffer("token_type_ids", torch.zeros(1, 32, dtype=torch.long))
        self.embed = nn.Embedding(64, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        where = self.position_ids[:, :n]
        types = torch.gather(self.token_type_ids, 1, where).expand(ids.shape[0], n)
        valid = (ids + 3 >= 3).unsqueeze(-1)
        return (self.embed(where + 1) + self.embed(types)) * valid.float()


def test_int64_values_moved_compared_or_offset_run_whole_in_openvino():
    model, ids = Positions().eval(), idx(50, 2, 7)
    program = nativert.to_backend(
        torch.export.export(model, (ids,)), delegates=["openvino"], compare_with_pytorch=False
    )
    report = nativert.delegation_report(program)
    assert report.delegated_nodes == report.total_nodes, str(report)
    with torch.no_grad():
        assert_close(nativert.Executor(program)(ids), model(ids))


def test_int64_beyond_int32_is_refused_where_it_enters_never_truncated():
    # A weight beyond +-2**30 is caught when compiling: its region stays in PyTorch.
    model, ids = Positions(largest=2**40).eval(), idx(50, 2, 7)
    program = nativert.to_backend(
        torch.export.export(model, (ids,)), delegates=["openvino"], compare_with_pytorch=False
    )
    kept = [n.meta.get(REASON_KEY, "") for n in program.graph.nodes if REASON_KEY in n.meta]
    assert any("with its weights: int64 weight 'position_ids'" in r for r in kept), kept
    # A swap to such weights is refused, and the old ones keep serving.
    small = Positions().eval()
    program = nativert.to_backend(
        torch.export.export(small, (ids,)), delegates=["openvino"], compare_with_pytorch=False
    )
    executor = nativert.Executor(program)
    big = dict(executor.weights(), position_ids=torch.arange(32).unsqueeze(0) * 2**40)
    with pytest.raises(nativert.WeightsError, match="'position_ids' holds values beyond"):
        executor.update_weights(big)
    with torch.no_grad():
        assert_close(executor(ids), small(ids))
    # An input beyond it is refused on the call that passes it.

    class Offsets(nn.Module):
        def forward(self, ids):
            return (ids + 1).unsqueeze(0), torch.relu(ids.float())

    offsets = nativert.to_backend(
        torch.export.export(Offsets(), (ids,)),
        delegates=["openvino"],
        strict=True,
        compare_with_pytorch=False,
    )
    runner = nativert.Executor(offsets)
    assert_close(runner(ids)[0], Offsets()(ids)[0])
    with pytest.raises(nativert.DelegateCallError, match="input 0 holds int64 values beyond"):
        runner(ids + 2**31)


class Int64Risks(nn.Module):
    """int64 arithmetic int32 would get wrong: a scaled add, int32 promoted by cat, a
    comparison with a literal beyond int32."""

    def forward(self, ids: torch.Tensor, small: torch.Tensor):
        scaled = torch.add(ids, 3, alpha=2**23).unsqueeze(0)
        promoted = torch.cat([small, ids]) + 1
        far = (ids == 2**32 + 1).unsqueeze(0)
        return scaled, promoted, far


def test_int64_arithmetic_that_could_leave_int32_stays_in_pytorch():
    ids, small = idx(50, 6), torch.tensor([2**31 - 1, 5], dtype=torch.int32)
    model = Int64Risks()
    program = nativert.to_backend(
        torch.export.export(model, (ids, small)), delegates=["openvino"], compare_with_pytorch=False
    )
    kept = [
        str(n.target)
        for n in program.graph.nodes
        if n.meta.get(REASON_KEY, "").startswith("openvino: int64 values")
    ]
    # the scaled add, the add after the promoting cat, the far comparison: each kept
    assert sorted(kept).count("aten.add.Tensor") == 2 and "aten.eq.Scalar" in kept, kept
    with torch.no_grad():
        for got, expected in zip(program.module()(ids, small), model(ids, small), strict=True):
            assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("op", "call", "tensors", "reason"),
    [
        (aten.mul.Tensor, aten.mul.Tensor, (r(3).double(), r(3).double()), "dtype float64"),
        (aten.mul.Tensor, aten.mul.Tensor, (r(3).half(), r(3).half()), "dtype float16"),
        (aten.abs.default, aten.abs.default, (mask(3),), "dtype bool"),
        (aten.add.Tensor, aten.add.Tensor, (idx(9, 3), idx(9, 3)), "computes int64 as int32"),
        (aten.var.correction, lambda x: aten.var.correction(x, [1]), (r(2, 5),), "correction"),
        (
            aten.scaled_dot_product_attention.default,
            lambda q, k, v: aten.scaled_dot_product_attention.default(q, k, v, dropout_p=0.1),
            (r(1, 2, 3, 4), r(1, 2, 3, 4), r(1, 2, 3, 4)),
            "dropout",
        ),
        (
            aten.avg_pool2d.default,
            lambda x: aten.avg_pool2d.default(x, [2, 2], [2, 2], [0, 0], False, True, 3),
            (r(1, 2, 4, 4),),
            "divisor_override",
        ),
        (
            aten.native_layer_norm.default,
            lambda x, w, b: aten.native_layer_norm.default(x, [4], w, b, 1e-5),
            (r(2, 4), r(4), r(4)),
            "saved statistics",
        ),
    ],
    ids=["f64", "f16", "bool-abs", "int64-data", "var", "sdpa-dropout", "divisor", "ln-stats"],
)
def test_table_refuses_what_would_not_convert_or_match(op, call, tensors, reason):
    class Module(nn.Module):
        def forward(self, *tensors):
            return call(*tensors)

    program = torch.export.export(Module(), tensors)
    (node,) = [n for n in program.graph.nodes if n.target is op]
    assert reason in (OpenVinoDelegate().check_support(node) or "supported")


def test_dynamic_batch_one_compile_several_shapes():
    model, (x,) = build("convnet")
    program = nativert.to_backend(
        torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", max=64)},)),
        delegates=["openvino"],
    )
    (segment,) = nativert.lowered_modules(program)
    runnable = program.module()
    for batch in (1, 5, 13, 5):
        xb = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert_close(runnable(xb), model(xb), what=f"batch {batch}", **FLOAT32)
    assert len(segment.executor._shapes) == 3  # one compiled model, three signatures


@pytest.mark.parametrize(
    ("name", "dynamic", "shapes", "kept"),
    [
        # Symbolic sizes are computed in PyTorch and cross into the segment as ints.
        (
            "transformer",
            ({0: Dim("batch", max=8), 1: Dim("seq", max=64)},),
            [(2, 5, 32), (1, 11, 32)],
            {"aten.sym_size.int": 2},
        ),
        ("convnet", None, [(4, 3, 16, 16)], {}),
    ],
)
def test_to_backend_with_openvino_runs_through_the_executor(name, dynamic, shapes, kept):
    model, inputs = build(name)
    program = nativert.to_backend(
        torch.export.export(model, inputs, dynamic_shapes=dynamic), delegates=["openvino"]
    )
    program.validate()
    assert [m.backend_id for m in nativert.lowered_modules(program)] == ["openvino"]
    report = nativert.delegation_report(program)
    assert {op: by["pytorch"] for op, by in report.ops.items() if "pytorch" in by} == kept
    executor = nativert.Executor(program)
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            assert_close(executor(x), model(x), what=f"{name} {shape}", **FLOAT32)


def _segment_and_executor(name="mlp", **options):
    model, inputs = build(name)
    program = nativert.to_backend(
        torch.export.export(model, inputs), delegates=["openvino"], **options
    )
    (segment,) = nativert.lowered_modules(program)
    executor = segment.load_executor()
    executor.init_weights({n: segment.original_module.state_dict[n] for n in segment.weight_names})
    return model, inputs, segment, executor


def test_weight_swap_stages_then_commits_and_bad_weights_change_nothing():
    model, (x,), segment, executor = _segment_and_executor()
    with torch.no_grad():
        old = model(x)
        new = {n: torch.randn_like(t) for n, t in segment.original_module.state_dict.items()}
        new = {n: new[n] for n in segment.weight_names}
        executor.process_weights(new)
        assert_close(executor.run([x])[0], old, what="staged, not committed", **FLOAT32)
        executor.commit_weights()
        expected = segment.run_reference([*new.values(), x])[0]
        assert_close(executor.run([x])[0], expected, what="after commit", **FLOAT32)
        bad = {**new, segment.weight_names[0]: torch.randn(2, 2)}
        with pytest.raises(nativert.WeightsError, match=segment.weight_names[0]):
            executor.process_weights(bad)
        assert_close(executor.run([x])[0], expected, what="after a rejected update", **FLOAT32)


def test_payload_carries_no_weight_values():
    _, _, segment, _ = _segment_and_executor("mlp")
    weights = segment.original_module.state_dict
    payload = segment.processed_bytes
    assert len(payload) < sum(t.numel() * t.element_size() for t in weights.values()) / 4
    assert weights["fc2.weight"].detach().numpy().tobytes()[:64] not in payload


def test_compiled_with_float32_latency_and_the_thread_setting():
    _, _, segment, executor = _segment_and_executor("mlp", num_threads=1)
    assert {s.key: s.value for s in segment.compile_specs} == {"inference_num_threads": 1}
    compiled = executor.active_state().model
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert str(compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")


def test_output_that_passes_an_input_through_is_fresh_every_call():
    class PassThrough(nn.Module):
        def forward(self, x):
            return aten.clone.default(x), x * 2

    x = torch.randn(4)
    program = nativert.to_backend(torch.export.export(PassThrough(), (x,)), OPENVINO, passes=[])
    (segment,) = nativert.lowered_modules(program)
    executor = segment.load_executor()
    executor.init_weights({})
    original = x.clone()
    for _ in range(3):  # the first call learns shapes; later ones write into fresh tensors
        same, double = executor.run([x])
        assert_close(x, original, what="the input (OpenVINO must not write into it)")
        assert_close((same, double), (original, original * 2))
        assert same.data_ptr() != x.data_ptr()


def test_saved_package_loads_without_trust(tmp_path):
    model, (x,) = build("mlp")
    program = nativert.to_backend(torch.export.export(model, (x,)), OPENVINO)
    nativert.save(program, tmp_path / "model.pt2")
    loaded = nativert.load(tmp_path / "model.pt2")  # no trust_native_code: an IR is data
    (segment,) = nativert.lowered_modules(loaded)
    assert segment.reference_reason is None
    with torch.no_grad():
        assert_close(nativert.Executor(loaded)(x), model(x), **FLOAT32)


# -- untrusted payloads ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def payload() -> bytes:
    model, inputs = build("transformer")
    program = nativert.to_backend(torch.export.export(model, inputs), OPENVINO)
    (segment,) = nativert.lowered_modules(program)
    return segment.processed_bytes


def _rebuilt(payload: bytes, edit) -> bytes:
    parts = ir.unpack(payload)
    xml, blob, parameters = edit(parts.xml.decode(), parts.bin, list(parts.parameters))
    return ir.pack(ir.Payload(tuple(parameters), parts.outputs, xml.encode(), blob))


def _first_layer_of(xml: str, kind: str) -> str:
    start = xml.index(f'type="{kind}"')
    return xml[xml.rindex("<layer ", 0, start) : xml.index(">", start) + 1]


# Each edit: (xml, blob, header parameters) -> the same, tampered with.
def _extension_op(xml, blob, parameters):
    layer = _first_layer_of(xml, "MatMul")
    return (
        xml.replace(layer, layer.replace('version="opset1"', 'version="extension"')),
        blob,
        parameters,
    )


def _unknown_opset(xml, blob, parameters):
    return xml.replace('version="opset1"', 'version="custom_opset"', 1), blob, parameters


def _constant_outside_blob(xml, blob, parameters):
    return xml, blob[: len(blob) // 2], parameters


def _constant_bigger_than_its_data(xml, blob, parameters):
    bigger = re.sub(r'(type="Const".*?shape=")[\d, ]*"', r'\g<1>999"', xml, count=1, flags=re.S)
    return bigger, blob, parameters


def _dtd(xml, blob, parameters):
    return xml.replace("<net ", '<!DOCTYPE net [<!ENTITY e "e">]>\n<net ', 1), blob, parameters


def _runtime_options(xml, blob, parameters):
    options = '<rt_info><runtime_options><KV_CACHE_PRECISION value="u8" /></runtime_options>'
    return xml.replace("</net>", options + "</rt_info></net>"), blob, parameters


def _renamed_input(xml, blob, parameters):
    return xml, blob, [["renamed", *parameters[0][1:]], *parameters[1:]]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_extension_op, "not a standard opset"),
        (_unknown_opset, "not a standard opset"),
        (_constant_outside_blob, "of a .*-byte blob"),
        (_constant_bigger_than_its_data, "bytes for shape"),
        (_dtd, "DTD or entities"),
        (_runtime_options, "rt_info"),
        (_renamed_input, "not the ones its header"),
    ],
)
def test_check_payload_refuses_crafted_payloads(payload, edit, match):
    delegate = OpenVinoDelegate()
    delegate.check_payload(payload)  # the real one passes
    with pytest.raises(ValueError, match=match):
        delegate.check_payload(_rebuilt(payload, edit))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"PK\x03\x04 a zip", "bad magic"),
        (ir.MAGIC + b"\x00" * 4, "truncated"),
        (ir.MAGIC + ir._LENGTHS.pack(2, 0, 0) + b"{}", "format 1"),
        (ir.MAGIC + ir._LENGTHS.pack(9, 0, 0) + b"{}", "do not add up"),
    ],
)
def test_check_payload_refuses_malformed_containers(data, match):
    with pytest.raises(ValueError, match=match):
        OpenVinoDelegate().check_payload(data)


def test_header_parameters_must_be_weights_or_inputs(payload):
    parts = ir.unpack(payload)
    header = {"format": 1, "parameters": [["x", "code", "os.system"]], "outputs": 1}
    raw = json.dumps(header).encode()
    data = ir.MAGIC + ir._LENGTHS.pack(len(raw), len(parts.xml), 0) + raw + parts.xml
    with pytest.raises(ValueError, match="must list"):
        OpenVinoDelegate().check_payload(data)


def test_unavailable_without_the_package_says_what_to_install():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["openvino"] = None  # as if it were not installed
        import nativert
        print(nativert.get_delegate("openvino").is_available().reason)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "missing Python package openvino" in out.stdout
    assert OpenVinoDelegate().toolchain()["openvino"].startswith("20")

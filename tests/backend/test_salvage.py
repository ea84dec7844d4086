"""A region that fails to compile is salvaged piece by piece, not dropped whole.

Real failures, real runtimes: ONNX Runtime refuses `amax` over dim 0 of a 0-d tensor when it
builds the session ([ShapeInferenceError] axis must be in [-rank, rank-1]), after
torch.onnx.export succeeded. Everything around that node must still be delegated, the
failure must be reported once (and on that node only), and the refused payload must never
reach the cache.
"""

from __future__ import annotations

import pytest
import torch

import nativert
from nativert.backend.cache import payload_cache
from nativert.backend.pipeline import lower_program
from tests.conftest import assert_close
from tests.partitioner.delegates import muls


class AmaxOfScalar(torch.nn.Module):
    """linear -> relu -> [sum -> amax(dim=0) of the 0-d sum] -> add -> linear -> tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        peak = torch.amax(h.sum(), dim=0)
        return torch.tanh(self.b(h + peak))


def _program():
    torch.manual_seed(0)
    model = AmaxOfScalar().eval()
    x = torch.randn(4, 16)
    return model, x, torch.export.export(model, (x,))


def _pytorch_nodes(program):
    report = nativert.delegation_report(program)
    return {op: by["pytorch"] for op, by in report.ops.items() if by.get("pytorch")}


def test_failing_node_stays_in_pytorch_and_the_rest_is_delegated(tmp_path):
    model, x, program = _program()
    errors = []
    settings = nativert.Settings(
        delegates=["onnxruntime"], cache_dir=str(tmp_path), compare_with_pytorch=False
    )
    result = lower_program(program, settings, on_fallback=errors.append)
    lowered = result.program

    assert _pytorch_nodes(lowered) == {"aten.amax.default": 1}
    report = nativert.delegation_report(lowered)
    assert len(report.regions) == 2  # before and after the amax
    assert {r.backend_id for r in report.regions} == {"onnxruntime"}
    [reason] = report.reasons["aten.amax.default"]
    assert "ShapeInferenceError" in reason and "onnxruntime" in reason
    # One error for the region, naming the node kept and what was delegated.
    [error] = errors
    assert "amax" in str(error) and "delegated in 2 region(s)" in str(error)
    assert result.fallbacks == (str(error),)

    expected = model(x)
    assert_close(lowered.module()(x), expected, atol=1e-5)
    assert_close(nativert.Executor(lowered)(x), expected, atol=1e-5)


def test_refused_payload_is_not_cached(tmp_path):
    model, x, program = _program()
    settings = nativert.Settings(
        delegates=["onnxruntime"], cache_dir=str(tmp_path), compare_with_pytorch=False
    )
    lower_program(program, settings, on_fallback=lambda e: None)
    cache = payload_cache(str(tmp_path))
    payloads = [cache.get(path.stem) for path in tmp_path.rglob("*.payload")]
    assert payloads and all(p is not None for p in payloads)
    # The amax (ONNX ReduceMax) is in every payload ORT refused, and in no cached one.
    import onnx

    ops = [{n.op_type for n in onnx.load_from_string(p).graph.node} for p in payloads]
    assert all("ReduceMax" not in found for found in ops), ops
    # A second lowering hits the cache for the good pieces and still refuses the bad one.
    again = lower_program(program, settings, on_fallback=lambda e: None)
    assert again.cache_hits >= 2
    assert _pytorch_nodes(again.program) == {"aten.amax.default": 1}
    assert_close(nativert.Executor(again.program)(x), model(x), atol=1e-5)


def test_failing_node_goes_to_the_next_delegate():
    model, x, program = _program()
    settings = nativert.Settings(
        delegates=["onnxruntime", "openvino"], cache_dir=None, compare_with_pytorch=False
    )
    lowered = lower_program(program, settings, on_fallback=lambda e: None).program
    report = nativert.delegation_report(lowered)
    runners = {op: set(by) for op, by in report.ops.items()}
    assert runners["aten.amax.default"] == {"openvino"}
    assert "pytorch" not in {who for by in runners.values() for who in by} - {"pytorch"}
    assert [r.backend_id for r in report.regions].count("onnxruntime") == 2
    assert_close(nativert.Executor(lowered)(x), model(x), atol=1e-5)


def test_a_delegate_that_does_not_support_the_failing_node_is_skipped(registered):
    """onnxruntime fails on the amax; `muls` (next in priority) does not support amax; the
    node must reach the delegate after it, not stop at the one that cannot take it."""
    registered(muls())
    model, x, program = _program()
    settings = nativert.Settings(
        delegates=["onnxruntime", "muls", "eager"], cache_dir=None, compare_with_pytorch=False
    )
    lowered = lower_program(program, settings, on_fallback=lambda e: None).program
    report = nativert.delegation_report(lowered)
    runners = {op: set(by) for op, by in report.ops.items()}
    assert runners["aten.amax.default"] == {"eager"}, str(report)
    assert "muls" not in {r.backend_id for r in report.regions}
    assert_close(nativert.Executor(lowered)(x), model(x), atol=1e-5)


def test_strict_raises_the_first_failure():
    _, _, program = _program()
    with pytest.raises(nativert.DelegateCompileError, match="ShapeInferenceError"):
        nativert.to_backend(program, delegates=["onnxruntime"], strict=True, cache_dir=None)


def test_t5_attention_is_delegated_whole_and_differentiable():
    """T5 reshapes SDPA's transposed output; its strides differ between SDPA's kernels, and
    the segment is traced again (torch.onnx.export, the gradient probe) where another
    kernel may be picked. The region used to fail whole ("Cannot view a tensor ...")."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        d_model=128, d_ff=256, num_layers=2, num_heads=4, d_kv=32, vocab_size=1000
    )
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 1000, (2, 32))
    errors = []
    settings = nativert.Settings(
        delegates=["onnxruntime"], cache_dir=None, compare_with_pytorch=False
    )
    program = torch.export.export(model, (ids,))
    lowered = lower_program(program, settings, on_fallback=errors.append).program
    assert errors == []
    kept = _pytorch_nodes(lowered)
    assert set(kept) <= {"aten._assert_tensor_metadata.default"}, kept
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    assert_close(nativert.Executor(lowered)(ids).last_hidden_state, expected, atol=1e-4)
    # Gradients through the delegate reach the weights as in eager.
    weight = "encoder.block.0.layer.0.SelfAttention.q.weight"
    model(ids).last_hidden_state.sum().backward()
    expected_grad = dict(model.named_parameters())[weight].grad.clone()
    model.zero_grad()
    module = lowered.module()
    module(ids).last_hidden_state.sum().backward()
    assert_close(dict(module.named_parameters())[weight].grad, expected_grad, atol=1e-3)

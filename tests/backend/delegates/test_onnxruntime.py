"""The onnxruntime delegate, for real: lowering, numerics, dynamic shapes, weights, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.export import Dim

import nativert
from nativert.partitioner.base import REASON_KEY, TAG_KEY, DelegationSpec, PartitionResult
from tests.conftest import assert_close, assert_same_gradients, run_in_threads
from tests.models import make

pytestmark = pytest.mark.skipif(
    not nativert.get_delegate("onnxruntime").is_available(),
    reason=str(nativert.get_delegate("onnxruntime").is_available().reason),
)

ORT = nativert.AllNodePartitioner("onnxruntime")


def lower_whole(name, **export_kwargs):
    model, inputs = make(name)
    program = nativert.to_backend(torch.export.export(model, inputs, **export_kwargs), ORT)
    return model, inputs, program


def kept_in_pytorch(program):
    report = nativert.delegation_report(program)
    return {op: by["pytorch"] for op, by in report.ops.items() if by.get("pytorch")}


@pytest.mark.parametrize("name", ["mlp", "convnet", "transformer", "lstm", "embedding"])
def test_model_lowered_whole_matches_eager(name):
    model, inputs, program = lower_whole(name)
    program.validate()
    assert [m.backend_id for m in nativert.lowered_modules(program)] == ["onnxruntime"]
    assert kept_in_pytorch(program) == {}
    # float32 through a different runtime: 1e-5, except the LSTM's long chain of gates.
    atol = 1e-4 if name == "lstm" else 1e-5
    with torch.no_grad():
        assert_close(program.module()(*inputs), model(*inputs), atol=atol)


def test_default_partitioner_prefers_onnxruntime():
    model, inputs = make("mlp")
    program = nativert.to_backend(torch.export.export(model, inputs))
    assert {m.backend_id for m in nativert.lowered_modules(program)} == {"onnxruntime"}


def test_custom_op_splits_two_ort_regions_around_pytorch():
    model, inputs = make("custom_op")
    program = nativert.to_backend(torch.export.export(model, inputs), compare_with_pytorch=False)
    program.validate()
    assert [m.backend_id for m in nativert.lowered_modules(program)] == ["onnxruntime"] * 2
    assert kept_in_pytorch(program) == {"nativert_test.shift.default": 1}
    shift = next(n for n in program.graph.nodes if "shift" in str(n.target))
    # eager, the reference delegate, is not a default candidate next to a real one.
    assert shift.meta[REASON_KEY] == (
        "onnxruntime: nativert_test.shift.default is not in the support table"
    )
    with torch.no_grad():
        assert_close(program.module()(*inputs), model(*inputs))


def test_dynamic_batch_lowered_once():
    model, _, program = lower_whole("mlp", dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    (lowered,) = nativert.lowered_modules(program)
    runnable = program.module()
    for batch in (1, 5, 17):
        x = torch.randn(batch, 32)
        with torch.no_grad():
            assert_close(runnable(x), model(x), what=f"batch {batch}")
    assert len(lowered.executor._shape_cache) == 3  # one session, three cached signatures


def test_symbolic_size_computed_in_pytorch_reaches_ort_segment():
    class ReshapeBySize(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = torch.sin(self.fc(x))  # sin stays in PyTorch: the size crosses the boundary
            return y.reshape(y.shape[0], 2, 4).relu() * 2

    model, x = ReshapeBySize().eval(), torch.randn(3, 8)
    program = nativert.to_backend(
        torch.export.export(model, (x,), dynamic_shapes=({0: Dim("b", min=1, max=32)},)),
        nativert.CapabilityPartitioner(exclude_ops=["aten::sin"]),
    )
    call = next(
        n
        for n in program.graph.nodes
        if n.target is nativert.call_delegate
        and any(isinstance(a.meta.get("val"), torch.SymInt) for a in n.args[1:])
    )
    assert call is not None
    executor = nativert.Executor(program)
    for batch in (1, 5, 32):
        xb = torch.randn(batch, 8)
        with torch.no_grad():
            assert_close(executor(xb), model(xb), what=f"batch {batch}")


def test_gradients_through_onnxruntime_segment():
    model, (x,), program = lower_whole("mlp")
    runnable = program.module()
    reference = copy.deepcopy(model)  # .module() shares the model's Parameters
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    runnable(x1).square().sum().backward()
    reference(x2).square().sum().backward()
    assert_close(x1.grad, x2.grad, what="x.grad")
    assert_same_gradients(runnable, reference)


@pytest.fixture
def mlp_executor():
    model, (x,), program = lower_whole("mlp")
    (lowered,) = nativert.lowered_modules(program)
    return model, x, lowered.executor


def test_weight_update_process_then_commit(mlp_executor):
    model, x, executor = mlp_executor
    new = {name: torch.randn_like(t) for name, t in model.state_dict().items()}
    executor.process_weights(new)
    with torch.no_grad():
        assert_close(executor.run([x])[0], model(x), what="staged weights must not be active")
        executor.commit_weights()
        model.load_state_dict(new)
        assert_close(executor.run([x])[0], model(x), what="after commit")


def test_bad_weight_update_raises_and_keeps_old_weights(mlp_executor):
    model, x, executor = mlp_executor
    bad = {name: torch.randn_like(t) for name, t in model.state_dict().items()}
    bad["fc2.weight"] = torch.randn(3, 3)
    with pytest.raises(
        nativert.WeightsError, match=r"'fc2.weight' has shape \(3, 3\), expected \(64, 64\)"
    ):
        executor.process_weights(bad)
    with pytest.raises(nativert.WeightsError, match="nothing staged"):
        executor.commit_weights()
    with torch.no_grad():
        assert_close(executor.run([x])[0], model(x))


def test_payload_carries_no_weight_data():
    model, _, program = lower_whole("mlp")
    (lowered,) = nativert.lowered_modules(program)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert len(lowered.processed_bytes) < weight_bytes / 2


def test_inputs_of_every_kind():
    class Kinds(torch.nn.Module):
        def forward(self, x, mask, ids):
            y = x.t() * 2  # the caller also passes a non-contiguous x
            return y.sum(), (x > 0) & mask, ids * 3, y.half()

    x = torch.randn(4, 3)
    mask = torch.rand(4, 3) > 0.5
    ids = torch.randint(0, 9, (5,))
    program = nativert.to_backend(torch.export.export(Kinds(), (x, mask, ids)), ORT)
    # `.half()` leaves a metadata assertion, which the default passes remove: all delegated.
    assert kept_in_pytorch(program) == {}
    xt = torch.randn(3, 4).t()
    assert not xt.is_contiguous()
    with torch.no_grad():
        got = program.module()(xt, mask, ids)
        assert_close(got, Kinds()(xt, mask, ids))
    assert got[0].dim() == 0


class ForceEverythingToOrt:
    """Tags every node for onnxruntime, including a custom op it cannot export."""

    def partition(self, program):
        for node in program.graph.nodes:
            if node.op == "call_function":
                node.meta[TAG_KEY] = "forced"
        return PartitionResult(program, {"forced": DelegationSpec("onnxruntime")})

    def ops_to_preserve(self):
        return nativert.get_delegate("onnxruntime").ops_to_preserve()


def test_compile_failure_raises_when_strict_naming_segment_and_node():
    model, inputs = make("custom_op")
    with pytest.raises(
        nativert.DelegateCompileError,
        match=r"delegate 'onnxruntime' failed to compile segment 'forced'.*"
        r"cannot translate node 'shift' \(nativert_test.shift.default\)",
    ):
        nativert.to_backend(torch.export.export(model, inputs), ForceEverythingToOrt(), strict=True)


def test_compile_failure_falls_back_to_pytorch_and_reports_it(caplog):
    model, inputs = make("custom_op")
    with caplog.at_level("WARNING", logger="nativert"):
        program = nativert.to_backend(torch.export.export(model, inputs), ForceEverythingToOrt())
    program.validate()
    # The region is split around the node ONNX cannot take: a -> [shift] -> relu -> b.
    assert len(nativert.delegate_nodes(program)) == 2
    (record,) = [r for r in caplog.records if r.name == "nativert"]
    assert "failed to compile segment 'forced'" in record.getMessage()
    assert "kept in PyTorch: shift" in record.getMessage()
    report = nativert.delegation_report(program)
    assert {op for op, by in report.ops.items() if by.get("pytorch")} == {
        "nativert_test.shift.default"
    }
    (reason,) = report.reasons["nativert_test.shift.default"]
    assert "cannot translate node 'shift'" in reason
    with torch.no_grad():
        assert_close(program.module()(*inputs), model(*inputs))


def test_unknown_compile_spec_is_rejected_before_anything_compiles():
    with pytest.raises(
        nativert.SettingsError,
        match=r"compile_specs\['onnxruntime'\]: .*no compile specs \['threads'\]; valid: "
        r"\['intra_op_num_threads', 'intra_op_spinning', 'log_severity_level', 'precision',"
        r" 'prepack_weights'\]",
    ):
        nativert.AllNodePartitioner("onnxruntime", compile_specs={"threads": 2})
    with pytest.raises(nativert.DelegateCompileError, match=r"unknown compile specs \['threads'\]"):
        nativert.get_delegate("onnxruntime").preprocess(
            torch.export.export(*make("mlp")), [nativert.CompileSpec("threads", 2)]
        )


def test_intra_op_threads_from_compile_specs():
    model, inputs = make("mlp")
    partitioner = nativert.AllNodePartitioner(
        "onnxruntime", compile_specs={"intra_op_num_threads": 1}
    )
    program = nativert.to_backend(torch.export.export(model, inputs), partitioner)
    (lowered,) = nativert.lowered_modules(program)
    assert lowered.executor._threads == 1
    with torch.no_grad():
        assert_close(program.module()(*inputs), model(*inputs))


@pytest.mark.parametrize("mode, allow", [(None, "1"), ("always", "1"), ("never", "0")])
def test_intra_op_spinning_from_compile_specs(mode, allow):
    model, inputs = make("mlp")
    specs = {} if mode is None else {"intra_op_spinning": mode}
    partitioner = nativert.AllNodePartitioner("onnxruntime", compile_specs=specs)
    program = nativert.to_backend(torch.export.export(model, inputs), partitioner)
    (lowered,) = nativert.lowered_modules(program)
    options = lowered.executor.active_state().session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    with torch.no_grad():
        assert_close(program.module()(*inputs), model(*inputs))


def test_bad_intra_op_spinning_is_rejected_before_anything_compiles():
    with pytest.raises(
        nativert.SettingsError,
        match=r"compile spec 'intra_op_spinning' must be one of \['always', 'never'\], "
        r"got True",
    ):
        nativert.AllNodePartitioner("onnxruntime", compile_specs={"intra_op_spinning": True})
    with pytest.raises(nativert.DelegateCompileError, match=r"'intra_op_spinning' must be one"):
        nativert.get_delegate("onnxruntime").preprocess(
            torch.export.export(*make("mlp")), [nativert.CompileSpec("intra_op_spinning", "off")]
        )


def test_concurrent_callers_with_fresh_inputs_get_their_own_results(mlp_executor):
    """4 threads, each calling with 50 distinct input tensors kept alive (so every call has
    a new data pointer): an executor that bound inputs once, or shared a binding between
    threads, would return another call's result."""
    model, _, executor = mlp_executor

    def worker(k: int) -> None:
        gen = torch.Generator().manual_seed(k)
        inputs = [torch.randn(4, 32, generator=gen) for _ in range(50)]
        with torch.no_grad():
            expected = [model(x) for x in inputs]
            for _ in range(3):
                for i, x in enumerate(inputs):
                    assert_close(executor.run([x])[0], expected[i], what=f"thread {k} input {i}")

    run_in_threads(*(lambda k=k: worker(k) for k in range(4)))


@pytest.mark.parametrize(
    "device",
    [
        "meta",  # runs everywhere: the check is the same for any non-CPU device
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_tensor_on_another_device_is_a_clear_error(mlp_executor, device):
    _, x, executor = mlp_executor
    with pytest.raises(nativert.DelegateCallError, match=f"is on {device}.*move inputs to CPU"):
        executor.run([x.to(device)])

"""compare_with_pytorch: the default never keeps a plan that measured slower than PyTorch.

The rule is tested, not a timing: the measurement (`time_interleaved`) is replaced by fixed
times, and the tests check which plan each set of times keeps, that the kept plan answers as
eager does, and that measuring leaves nothing behind (batch-norm stats, the RNG).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nativert
from nativert import last_compile_report
from nativert.backend import autotune
from nativert.backend.autotune import MIXED, PYTORCH, faster_plan
from nativert.backend.compile import choose as choose_module
from nativert.call_delegate import lowered_modules
from nativert.partitioner.capability import CapabilityPartitioner
from tests.conftest import assert_close
from tests.models import TrainBN, make


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fixed_times(monkeypatch, module, times: dict[str, float]) -> list[dict]:
    """Replace `module.time_interleaved` by `times`; returns the cases it was asked to time."""
    asked: list[dict] = []

    def timer(cases, **kwargs):
        asked.append(dict(cases))
        for fn in cases.values():
            fn()  # the cases must run
        return {name: times[name] for name in cases}

    monkeypatch.setattr(module, "time_interleaved", timer)
    return asked


# -- the rule -------------------------------------------------------------------------------
def test_the_rule_keeps_the_faster_plan_and_the_delegated_one_on_a_tie():
    assert faster_plan({MIXED: 2.0, PYTORCH: 1.0}) == PYTORCH
    assert faster_plan({MIXED: 1.0, PYTORCH: 2.0}) == MIXED
    assert faster_plan({MIXED: 1.0, PYTORCH: 1.0}) == MIXED


def test_a_custom_op_between_two_linears_is_not_delegated_when_the_hybrid_plan_is_slower(
    monkeypatch,
):
    model, (x,) = make("custom_op")
    ep = torch.export.export(model, (x,))
    asked = fixed_times(monkeypatch, autotune, {MIXED: 2.0, PYTORCH: 1.0})
    from nativert.backend.pipeline import lower_program

    result = lower_program(ep, nativert.Settings(cache_dir=None))
    assert str(result.tuning).startswith("compare_with_pytorch: 1 decision(s)"), result.tuning
    program = result.program
    assert len(asked) == 1 and set(asked[0]) == {MIXED, PYTORCH}
    assert lowered_modules(program) == []  # PyTorch alone: no hand-offs
    text = str(nativert.delegation_report(program))
    assert "compare_with_pytorch" in text and "-> pytorch" in text, text
    assert_close(nativert.Executor(program)(x), model(x))


def test_the_hybrid_plan_stays_when_it_is_faster(monkeypatch):
    model, (x,) = make("custom_op")
    ep = torch.export.export(model, (x,))
    fixed_times(monkeypatch, autotune, {MIXED: 1.0, PYTORCH: 2.0})
    program = nativert.to_backend(ep, cache_dir=None)
    assert len(lowered_modules(program)) == 2
    assert "-> mixed" in str(nativert.delegation_report(program))
    assert_close(nativert.Executor(program)(x), model(x))


def test_no_comparison_when_switched_off_whole_or_partitioned_by_the_caller(monkeypatch):
    asked = fixed_times(monkeypatch, autotune, {MIXED: 2.0, PYTORCH: 1.0})
    model, (x,) = make("custom_op")
    ep = torch.export.export(model, (x,))
    off = nativert.to_backend(ep, cache_dir=None, compare_with_pytorch=False)
    assert len(lowered_modules(off)) == 2
    partitioner = CapabilityPartitioner.from_settings(nativert.Settings())
    theirs = nativert.to_backend(ep, partitioner, cache_dir=None)
    assert len(lowered_modules(theirs)) == 2  # a caller's partitioner is honoured
    mlp, (y,) = make("mlp")
    whole = nativert.to_backend(torch.export.export(mlp, (y,)), cache_dir=None)
    assert len(lowered_modules(whole)) == 1  # one region, nothing in PyTorch: no hand-off
    assert asked == []


# -- torch.compile: per graph, on the first call's inputs -----------------------------------
def test_torch_compile_runs_pytorch_when_the_delegated_graph_is_slower(monkeypatch):
    model, (x,) = make("mlp")
    asked = fixed_times(monkeypatch, choose_module, {"pytorch": 1.0, "nativert": 2.0})
    compiled = torch.compile(model, backend="nativert", options={"cache_dir": None})
    with torch.no_grad():
        assert_close(compiled(x), model(x))
        assert_close(compiled(x * 2), model(x * 2))
    report = last_compile_report()
    assert report.runs_on == "pytorch" and len(asked) == 1, str(report)
    assert "runs on pytorch (inference: pytorch 1.000 ms, nativert 2.000 ms)" in str(report)
    assert report.graphs[0].report.delegated_nodes > 0  # compiled, measured, not kept


def test_torch_compile_keeps_the_delegated_graph_when_it_is_faster(monkeypatch):
    model, (x,) = make("mlp")
    fixed_times(monkeypatch, choose_module, {"pytorch": 2.0, "nativert": 1.0})
    compiled = torch.compile(model, backend="nativert", options={"cache_dir": None})
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    assert last_compile_report().runs_on == "nativert"


@pytest.mark.parametrize("winner", ["pytorch", "nativert"])
def test_measuring_a_training_graph_leaves_no_trace(monkeypatch, winner):
    """Batch-norm stats advance once per call and dropout draws what eager draws, whichever
    candidate wins: the measurement's runs are undone."""
    times = {"pytorch": 1.0, "nativert": 2.0} if winner == "pytorch" else {}
    times = times or {"pytorch": 2.0, "nativert": 1.0}
    fixed_times(monkeypatch, choose_module, times)

    class Net(TrainBN):
        def forward(self, x):
            return nn.functional.dropout(super().forward(x), 0.5, training=True)

    torch.manual_seed(0)
    model = Net().train()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="nativert", options={"cache_dir": None})
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    out = compiled(x)
    out.sum().backward()
    torch.manual_seed(1)
    expected = reference(x)
    expected.sum().backward()
    assert last_compile_report().runs_on == winner
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert_close(model.bn.running_mean, reference.bn.running_mean, what="running_mean")
    assert int(model.bn.num_batches_tracked) == 1
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, what="grad")


def test_a_candidate_with_wrong_results_is_not_chosen(monkeypatch, caplog):
    from nativert.backend.compile.choose import checker, choose

    fixed_times(monkeypatch, choose_module, {"pytorch": 2.0, "nativert": 1.0})
    x = torch.randn(3)
    choice = choose(
        {"pytorch": lambda t: t * 2, "nativert": lambda t: t * 3},
        [x],
        training=False,
        check=checker("fp32", 1e-2),
    )
    assert choice.choice == "pytorch"
    (failed,) = [m for m in choice.measurements if m.runner == "nativert"]
    assert failed.ms is None and "wrong results" in failed.failure


def test_training_graphs_let_onnxruntime_threads_sleep():
    """Forward and backward graphs run between PyTorch code: ORT's threads must not spin
    after each call (they took the cores PyTorch needed next)."""
    model, (x,) = make("mlp")
    model.train()
    compiled = torch.compile(
        model, backend="nativert", options={"cache_dir": None, "compare_with_pytorch": False}
    )
    compiled(x.requires_grad_()).sum().backward()
    report = last_compile_report()
    specs = [
        dict((s.key, s.value) for s in lowered.compile_specs)
        for graph in report.graphs
        for lowered in lowered_modules(graph.program)
        if lowered.backend_id == "onnxruntime"
    ]
    assert len(specs) == 2 and all(s.get("intra_op_spinning") == "never" for s in specs), specs


@pytest.mark.slow
def test_autotune_measures_inductor_for_training_graphs(monkeypatch):
    fixed_times(monkeypatch, choose_module, {"pytorch": 3.0, "nativert": 2.0, "inductor": 1.0})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).train()
    reference = copy.deepcopy(model)
    options = {"cache_dir": None, "autotune": True, "delegates": ["onnxruntime"]}
    compiled = torch.compile(model, backend="nativert", options=options)
    x = torch.randn(4, 8)
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    report = last_compile_report()
    assert report.runs_on == "inductor", str(report)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, what="grad")


def test_under_autotune_a_graph_choice_is_cached_and_only_the_winner_compiled(
    monkeypatch, tmp_path
):
    asked = fixed_times(monkeypatch, choose_module, {"pytorch": 1.0, "nativert": 2.0})
    model, (x,) = make("mlp")
    options = {"autotune": True, "delegates": ["onnxruntime"], "cache_dir": str(tmp_path)}
    with torch.no_grad():
        assert_close(torch.compile(model, backend="nativert", options=options)(x), model(x))
        first = last_compile_report()
        torch._dynamo.reset()
        assert_close(torch.compile(model, backend="nativert", options=options)(x), model(x))
    second = last_compile_report()
    assert first.runs_on == second.runs_on == "pytorch"
    assert len(asked) == 1  # the second compile measured nothing
    assert second.choice.cached and "cached decision" in str(second)
    assert first.graphs and not second.graphs  # the loser was not compiled again
    torch._dynamo.reset()
    other = {**options, "delegates": ["onnxruntime", "openvino"]}
    with torch.no_grad():
        torch.compile(model, backend="nativert", options=other)(x)
    assert len(asked) == 2  # other settings, another decision


# -- what choose() is given: state, inference tensors, failures, randomness ------------------
def _choose(candidates, inputs, monkeypatch, *, training=False, times=None):
    from nativert.backend.compile.choose import checker, choose

    times = times or {name: float(i + 1) for i, name in enumerate(candidates)}
    fixed_times(monkeypatch, choose_module, times)
    return choose(candidates, inputs, training=training, check=checker("fp32", 1e-2))


def test_every_candidate_starts_from_the_state_the_call_came_with(monkeypatch):
    """A graph that writes a buffer and reads it back: both candidates compute the same, so
    neither is 'wrong'; and the buffer ends as it began (inference tensors included)."""

    def counter(x, state):
        state.add_(1)
        return (x + state,)

    for make_state in (torch.zeros, lambda n: torch.inference_mode()(torch.zeros)(n)):
        state, x = make_state(3), torch.randn(3)
        choice = _choose(
            {"pytorch": counter, "nativert": counter},
            [x, state],
            monkeypatch,
            times={"pytorch": 2.0, "nativert": 1.0},
        )
        assert choice.choice == "nativert", choice.line()
        assert torch.equal(state, torch.zeros(3))


def test_outputs_that_cannot_be_compared_fail_the_candidate_not_the_call(monkeypatch):
    def fine(x):
        return (x * 2,)

    def odd(x):
        return (torch.sparse_coo_tensor(torch.tensor([[0]]), x[:1] * 2, (3,)),)

    choice = _choose({"pytorch": fine, "nativert": odd}, [torch.randn(3)], monkeypatch)
    assert choice.choice == "pytorch"
    (failed,) = [m for m in choice.measurements if m.runner == "nativert"]
    assert failed.ms is None and failed.failure, failed


def test_a_graph_pytorch_cannot_run_as_timed_keeps_the_delegated_graph(monkeypatch):
    """Grad mode on and parameters requiring grad make a graph look like training; its
    backward may not exist (eager never runs it). The timing must not raise for the user."""

    class NoDerivative(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("the derivative for 'thing' is not implemented")

    def graph(x):
        return (NoDerivative.apply(x),)

    x = torch.randn(8, requires_grad=True)
    choice = _choose({"pytorch": graph, "nativert": graph}, [x], monkeypatch, training=True)
    assert choice.choice == "nativert"
    assert choice.measurements[0].ms is None and "derivative" in choice.measurements[0].failure


def test_random_ops_are_recognised_by_name_not_by_substring():
    from nativert.backend.compile.choose import draws_random_numbers

    def graph(fn):
        return torch.fx.symbolic_trace(fn)

    assert draws_random_numbers(graph(lambda x: nn.functional.dropout(x, 0.1)))
    assert draws_random_numbers(graph(lambda x: x + torch.rand_like(x)))
    assert draws_random_numbers(
        graph(lambda q: nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.1))
    )
    assert not draws_random_numbers(graph(lambda x: nn.functional.normalize(x)))
    assert not draws_random_numbers(graph(lambda x, t: nn.functional.poisson_nll_loss(x, t)))
    assert not draws_random_numbers(
        graph(lambda q: nn.functional.scaled_dot_product_attention(q, q, q))
    )

"""Autotune: each region's runner chosen by measurement, decisions cached, numerics kept.

No winner is asserted: which runner is faster belongs to the machine and its load. The tests
check the rule (the smallest measured median wins), the report and the numerics.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import nativert
from nativert.backend.autotune import PYTORCH, time_interleaved
from nativert.backend.delegates.eager import EagerDelegate
from nativert.backend.pipeline import lower_program
from nativert.delegate import ReferenceExecutor
from nativert.models import ConvBnRelu
from tests.conftest import assert_close


class Tiny(nn.Module):
    def forward(self, x):
        return x + 1


def _lower(model, inputs, tmp_path, **options):
    program = torch.export.export(model.eval(), inputs)
    settings = nativert.Settings(autotune=True, cache_dir=str(tmp_path / "cache"), **options)
    return lower_program(program, settings)


def test_the_fastest_measured_runner_wins_and_every_candidate_is_reported(tmp_path):
    """A one-op region: ONNX Runtime and PyTorch are close here, so the test checks the rule
    (the smallest median wins) rather than a winner."""
    model, x = Tiny(), torch.randn(4)
    result = _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    decision = result.tuning.decisions[0]
    times = {m.runner: m.ms for m in decision.measurements}
    assert list(times) == ["onnxruntime", PYTORCH]
    assert all(ms is not None and ms > 0 for ms in times.values())
    assert decision.choice == min(times, key=times.__getitem__), str(result.tuning)
    report = nativert.delegation_report(result.program)
    text = str(report)
    assert "autotune" in text and "onnxruntime" in text and " ms" in text, text
    assert_close(nativert.Executor(result.program)(x), model(x))


def test_a_heavy_region_goes_to_the_faster_runner_and_matches_eager(tmp_path):
    """Which runner is faster is the machine's (ONNX Runtime won by 3x on one CPU and lost by
    15% on another under load): the test checks that the measured faster one is chosen."""
    torch.manual_seed(0)
    model, x = ConvBnRelu().eval(), torch.randn(1, 3, 64, 64)
    result = _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    (decision,) = result.tuning.decisions
    times = {m.runner: m.ms for m in decision.measurements}
    assert set(times) == {"onnxruntime", PYTORCH}
    assert decision.choice == min(times, key=times.__getitem__), str(result.tuning)
    report = nativert.delegation_report(result.program)
    if decision.choice == "onnxruntime":
        assert report.delegated_nodes == report.total_nodes
        (region,) = report.regions
        assert "onnxruntime" in region.tuning and "pytorch" in region.tuning, region
    else:
        assert report.delegated_nodes == 0
    assert "autotune:" in str(report)
    with torch.no_grad():
        assert_close(nativert.Executor(result.program)(x), model(x), atol=1e-4, rtol=1e-4)


def test_decisions_are_reused_from_the_cache_without_timing_again(tmp_path, count_loads):
    model, x = Tiny(), torch.randn(4)
    first = _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    assert not any(d.cached for d in first.tuning.decisions)
    loads = count_loads("onnxruntime")
    second = _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    # The deciding decision is the last: the program's when plans were compared (a cached
    # whole-program choice then stands alone), else the region's. Which one wins is timing.
    assert second.tuning.decisions[-1].choice == first.tuning.decisions[-1].choice
    assert second.tuning.decisions[-1].tag == first.tuning.decisions[-1].tag
    assert all(d.cached for d in second.tuning.decisions)
    assert loads == []  # nothing was compiled-and-loaded to be timed
    assert "(cached decision)" in str(second.tuning)
    assert_close(nativert.Executor(second.program)(x), model(x))


def test_a_corrupt_cache_entry_is_ignored_and_tuned_again(tmp_path):
    model, x = Tiny(), torch.randn(4)
    _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    entries = list((tmp_path / "cache" / "autotune").glob("*.json"))
    assert entries
    for entry in entries:
        data = json.loads(entry.read_text())
        data["choice"] = "no_such_runner"
        entry.write_text(json.dumps(data))
    again = _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    assert not any(d.cached for d in again.tuning.decisions)
    assert_close(nativert.Executor(again.program)(x), model(x))


def test_a_spent_budget_keeps_the_default_and_caches_nothing(tmp_path):
    torch.manual_seed(0)
    model, x = ConvBnRelu().eval(), torch.randn(1, 3, 16, 16)
    result = _lower(
        model, (x,), tmp_path, delegates=["onnxruntime", "aoti"], autotune_budget_s=1e-6
    )
    assert result.tuning.budget_spent
    (decision,) = result.tuning.decisions
    aoti = next(m for m in decision.measurements if m.runner == "aoti")
    assert aoti.ms is None and "autotune_budget_s" in aoti.failure
    assert not (tmp_path / "cache" / "autotune").exists()
    assert "budget spent" in str(result.tuning)
    with torch.no_grad():
        assert_close(nativert.Executor(result.program)(x), model(x), atol=1e-4, rtol=1e-4)


def test_autotune_works_through_torch_compile(tmp_path):
    torch._dynamo.reset()
    model, x = Tiny(), torch.randn(4)
    options = {"autotune": True, "delegates": ["onnxruntime"], "cache_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="nativert", options=options)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    report = nativert.last_compile_report()
    assert "autotune" in str(report)


class InverseBetween(nn.Module):
    """linalg.inv between linear layers: export threads an effect token through its check."""

    def __init__(self) -> None:
        super().__init__()
        self.before = nn.Linear(8, 8)
        self.after = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.before(x))
        return self.after(torch.linalg.inv(h @ h.T + torch.eye(8) * 4))


def test_a_program_with_effect_tokens_is_tuned_and_matches(tmp_path):
    """Measuring runs the program with its token input (it used to refuse kind TOKEN)."""
    torch.manual_seed(0)
    model, x = InverseBetween().eval(), torch.randn(8, 8)
    result = _lower(model, (x,), tmp_path, delegates=["onnxruntime"])
    assert result.tuning.decisions, str(result.tuning)
    with torch.no_grad():
        assert_close(nativert.Executor(result.program)(x), model(x), atol=1e-4, rtol=1e-4)


def test_time_interleaved_ranks_a_slow_case_last():
    fast = torch.randn(8)
    slow = torch.randn(256, 256)
    times = time_interleaved({"fast": lambda: fast + 1, "slow": lambda: slow @ slow})
    assert times["fast"] < times["slow"]


@pytest.mark.slow
def test_a_custom_op_program_can_go_whole_to_aoti_or_stay_mixed_and_match(tmp_path):
    """ONNX Runtime cannot take a custom op; AOTInductor takes the whole program. Whatever
    the program-level measurement picks, the numbers match eager and the report says why."""
    from tests.models import make

    model, inputs = make("custom_op")
    result = _lower(model, inputs, tmp_path, delegates=["onnxruntime", "aoti"])
    program_level = [d for d in result.tuning.decisions if d.tag == "program"]
    assert program_level, str(result.tuning)
    runners = {m.runner for m in program_level[0].measurements}
    assert {"mixed", "aoti"} <= runners, str(result.tuning)
    with torch.no_grad():
        assert_close(nativert.Executor(result.program)(*inputs), model(*inputs), atol=1e-5)


def test_nativert_lower_autotune_prints_the_measurements_and_saves_a_working_package(tmp_path):
    from tests.e2e.test_cli_and_packaging import FACTORIES, nativert_cli

    (tmp_path / "factories.py").write_text(FACTORIES)
    args = ["--autotune", "--delegates", "onnxruntime", "--cache-dir", str(tmp_path / "c")]
    lowered = nativert_cli("lower", "factories.py:make", "-o", "m.pt2", *args, cwd=tmp_path)
    assert lowered.returncode == 0, lowered.stderr
    assert "Autotune: " in lowered.stdout and " ms" in lowered.stdout, lowered.stdout
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(nativert.Executor(nativert.load(tmp_path / "m.pt2"))(x), model(x))


class _WrongExecutor(ReferenceExecutor):
    """Right shapes and dtypes, wrong values, and faster than any real runner: it computes
    once, then returns the same off-by-one outputs every call."""

    _outputs = None

    def run_with(self, weights, inputs):
        if self._outputs is None:
            self._outputs = tuple(out + 1 for out in super().run_with(weights, inputs))
        return self._outputs


class WrongDelegate(EagerDelegate):
    """Takes every op, compiles, loads, and answers wrong."""

    backend_id = "wrong"
    reference = False

    def load(self, payload, compile_specs, *, reference):
        return _WrongExecutor(reference, name=self.backend_id)


def test_a_candidate_that_answers_wrong_is_never_chosen_and_is_reported(tmp_path, registered):
    """`wrong` would win every measurement, per region and for the whole program (the custom
    op keeps ONNX Runtime from taking it all, so the whole-program plans are timed too)."""
    from tests.models import make

    registered(WrongDelegate())
    model, inputs = make("custom_op")
    result = _lower(model, inputs, tmp_path, delegates=["onnxruntime", "wrong"])
    decisions = result.tuning.decisions
    assert {d.tag for d in decisions} > {"program"}, str(result.tuning)  # regions too
    for decision in decisions:
        assert decision.choice != "wrong", str(result.tuning)
        (wrong,) = [m for m in decision.measurements if m.runner == "wrong"]
        assert wrong.ms is None and "wrong results" in wrong.failure, str(result.tuning)
    report = str(nativert.delegation_report(result.program))
    assert "wrong failed (DelegateCompileError: wrong results" in report, report
    with torch.no_grad():
        assert_close(nativert.Executor(result.program)(*inputs), model(*inputs), atol=1e-5)

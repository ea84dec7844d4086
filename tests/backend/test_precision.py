"""`Settings.precision`: regions computed below fp32 where a delegate offers it, checked by
the accuracy guard, kept by packages and chosen among by autotune.

AOTInductor is the delegate that offers bf16 on every CPU (inductor emulates it where the CPU
lacks bf16 instructions), so the bf16 paths are tested with it; OpenVINO offers bf16 only
where its CPU plugin computes it natively (AVX512-BF16 or AMX), and its test skips elsewhere.
The AOTI segments share one payload cache (each shape and precision compiles once per run).

Tolerances: bf16 keeps 8 bits of mantissa; these models' outputs agree with fp32 eager within
a relative error of 2e-2 (max |error| / max |output|), the default budget being 1e-2 of the
guard's own measurement on the example inputs. fp32 results are compared bit for bit.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

import nativert
from nativert.backend.pipeline import lower_program
from nativert.passes import lower_precision

AOTI = nativert.get_delegate("aoti")
needs_aoti = pytest.mark.skipif(not AOTI.is_available(), reason=AOTI.is_available().reason)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 16)
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.relu(self.norm(self.fc1(x)))), steps + 1


def _inputs(batch: int = 4):
    return torch.randn(batch, 32), torch.arange(batch)


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).abs().max() / expected.abs().max()).detach())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("precision-cache"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mlp().eval()


def test_lower_precision_computes_inside_in_bf16_and_keeps_the_boundary(model):
    program = torch.export.export(
        model, _inputs(), dynamic_shapes=({0: Dim("b")}, {0: Dim("b")})
    ).run_decompositions()
    lowered = lower_precision(program, torch.bfloat16).program
    nodes = [n for n in lowered.graph.nodes if n.op == "call_function"]
    addmms = [n for n in nodes if n.target is torch.ops.aten.addmm.default]
    assert addmms and all(n.meta["val"].dtype == torch.bfloat16 for n in addmms)
    inputs = _inputs(7)  # another batch: dynamic dims survive
    got, expected = lowered.module()(*inputs), model(*inputs)
    assert [t.dtype for t in got] == [torch.float32, torch.int64]
    assert 0 < _rel(got[0], expected[0]) < 2e-2  # rounded, so really bf16, yet close
    assert torch.equal(got[1], expected[1])  # integers are never touched
    with pytest.raises(ValueError, match="takes torch.bfloat16 or torch.float16"):
        lower_precision(program, torch.float64)


def test_lower_precision_keeps_an_input_returned_as_it_is_in_fp32():
    class PassThrough(nn.Module):
        def forward(self, x):
            return x, x * 2

    program = torch.export.export(PassThrough(), (torch.randn(3),)).run_decompositions()
    lowered = lower_precision(program, torch.bfloat16).program
    x = torch.randn(3)
    same, doubled = lowered.module()(x)
    assert same.dtype == doubled.dtype == torch.float32 and torch.equal(same, x)


def test_fp32_is_exactly_what_lowering_did_before(model):
    program = torch.export.export(model, _inputs())
    plain = nativert.to_backend(program, cache_dir=None)
    fp32 = nativert.to_backend(program, precision="fp32", cache_dir=None)
    for a, b in zip(nativert.lowered_modules(plain), nativert.lowered_modules(fp32), strict=True):
        assert a.compile_specs == b.compile_specs and "precision" not in str(a.compile_specs)
        assert a.precision == b.precision == "fp32" and b.accuracy is None
    inputs = _inputs()
    for x, y in zip(plain.module()(*inputs), fp32.module()(*inputs), strict=True):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def bf16_program(model, cache_dir):
    program = torch.export.export(model, _inputs())
    return nativert.to_backend(program, delegates=["aoti"], precision="bf16", cache_dir=cache_dir)


@needs_aoti
def test_a_bf16_aoti_region_computes_in_bf16_and_reports_its_error(model, bf16_program):
    (segment,) = nativert.lowered_modules(bf16_program)
    assert segment.precision == "bf16"
    assert segment.accuracy is not None and 0 < segment.accuracy.max_rel <= 1e-2
    # The weights are converted once, by runtime constant folding: bf16 constants.
    executor = segment.load_executor()
    executor.init_weights({n: p for n, p in model.named_parameters()})
    inputs = _inputs()
    executor.run(list(inputs))
    dtypes = executor._runner.get_constant_names_to_dtypes()
    folded = {name: dtype for name, dtype in dtypes.items() if name.startswith("_FOLDED_CONST_")}
    assert folded and set(folded.values()) == {15}, dtypes  # 15: c10::ScalarType::BFloat16
    got, expected = nativert.Executor(bf16_program)(*inputs), model(*inputs)
    assert got[0].dtype == torch.float32 and 0 < _rel(got[0], expected[0]) < 2e-2
    assert torch.equal(got[1], expected[1])
    text = str(nativert.delegation_report(bf16_program))
    assert "bf16 (rel err " in text and "SQNR" in text, text


@needs_aoti
def test_a_weight_swap_on_a_bf16_region_converts_the_new_weights(model, bf16_program):
    executor = nativert.Executor(bf16_program)
    inputs = _inputs()
    before = executor(*inputs)[0]
    new = {name: torch.randn_like(w) for name, w in executor.weights().items()}
    executor.update_weights(new)
    fresh = Mlp().eval()
    fresh.load_state_dict(new)
    got, expected = executor(*inputs)[0], fresh(*inputs)[0]
    assert _rel(got, expected) < 2e-2 and not torch.allclose(got, before)


@needs_aoti
def test_the_guard_lowers_a_region_over_the_budget_in_fp32_and_says_so(model, cache_dir, caplog):
    program = torch.export.export(model, _inputs())
    with caplog.at_level(logging.WARNING, logger="nativert"):
        lowered = nativert.to_backend(
            program, delegates=["aoti"], precision="bf16", accuracy=1e-7, cache_dir=cache_dir
        )
    (segment,) = nativert.lowered_modules(lowered)
    assert segment.precision == "fp32" and segment.accuracy is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is lowered in fp32: bf16 rel err" in warnings[0], warnings
    assert "over accuracy=1e-07" in warnings[0]
    report = str(nativert.delegation_report(lowered))
    assert "accuracy guard: fp32, since bf16 rel err" in report, report
    inputs = _inputs()
    torch.testing.assert_close(lowered.module()(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)


@needs_aoti
def test_a_whole_program_lowered_in_bf16_is_guarded_too(model, cache_dir):
    program = torch.export.export(model, _inputs())
    whole = nativert.to_backend("aoti", program, precision="bf16", cache_dir=cache_dir)
    assert whole.precision == "bf16" and whole.accuracy.max_rel <= 1e-2
    inputs = _inputs()
    assert _rel(whole(*inputs)[0], model(*inputs)[0]) < 2e-2


@needs_aoti
def test_packages_keep_the_precision_and_inspect_and_bench_show_it(model, bf16_program, tmp_path):
    path = tmp_path / "bf16.pt2"
    nativert.save(bf16_program, path)
    loaded = nativert.load(path, trust_native_code=True)
    (segment,) = nativert.lowered_modules(loaded)
    (original,) = nativert.lowered_modules(bf16_program)
    assert segment.precision == "bf16" and segment.accuracy == original.accuracy
    inputs = _inputs()
    assert _rel(nativert.Executor(loaded)(*inputs)[0], model(*inputs)[0]) < 2e-2
    run = [sys.executable, "-m", "nativert"]
    out = subprocess.run(
        [*run, "inspect", str(path), "--json", "--trust-native-code"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (entry,) = json.loads(out)["delegates"]
    assert entry["precision"] == "bf16" and entry["accuracy"] == original.accuracy.to_json()
    bench = subprocess.run(
        [*run, "bench", str(path), "--runs", "2", "--warmup", "1", "--trust-native-code"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "precision bf16" in bench, bench


@needs_aoti
def test_autotune_measures_each_delegate_in_fp32_and_in_the_precision_asked(model, cache_dir):
    program = torch.export.export(model, _inputs())
    result = lower_program(
        program,
        nativert.Settings(delegates=["aoti"], precision="bf16", autotune=True, cache_dir=cache_dir),
    )
    (decision,) = result.tuning.decisions
    runners = {m.runner for m in decision.measurements}
    assert runners == {"aoti", "aoti@bf16", "pytorch"}, str(result.tuning)
    chosen = nativert.lowered_modules(result.program)
    if decision.choice == "aoti@bf16":
        assert chosen[0].precision == "bf16" and chosen[0].accuracy.max_rel <= 1e-2
    elif decision.choice == "aoti":
        assert chosen[0].precision == "fp32"
    else:
        assert chosen == []
    inputs = _inputs()
    assert _rel(nativert.Executor(result.program)(*inputs)[0], model(*inputs)[0]) < 2e-2


OPENVINO = nativert.get_delegate("openvino")


@pytest.mark.skipif(
    not OPENVINO.is_available() or "bf16" not in OPENVINO.precisions(),
    reason="OpenVINO's CPU plugin computes bf16 natively only on CPUs with AVX512-BF16 or AMX",
)
def test_openvino_bf16_runs_its_bf16_kernels(model):
    program = torch.export.export(model, _inputs())
    lowered = nativert.to_backend(program, delegates=["openvino"], precision="bf16", cache_dir=None)
    (segment,) = nativert.lowered_modules(lowered)
    assert segment.precision == "bf16" and segment.accuracy.max_rel <= 1e-2
    executor = segment.load_executor()
    executor.init_weights({n: p for n, p in model.named_parameters()})
    compiled = executor.active_state().model
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    runtime = compiled.get_runtime_model()
    precisions = {
        op.get_rt_info()["runtimePrecision"].astype(str) for op in runtime.get_ordered_ops()
    }
    assert "bf16" in precisions, precisions


@needs_aoti
def test_torch_compile_takes_the_precision_option(model, cache_dir):
    torch._dynamo.reset()
    compiled = torch.compile(
        model,
        backend="nativert",
        # The delegated graph is the subject: it is not timed against PyTorch's.
        options={
            "precision": "bf16",
            "delegates": ["aoti"],
            "cache_dir": cache_dir,
            "compare_with_pytorch": False,
        },
    )
    inputs = _inputs()
    with torch.no_grad():
        got, expected = compiled(*inputs), model(*inputs)
    assert 0 < _rel(got[0], expected[0]) < 2e-2 and torch.equal(got[1], expected[1])
    text = str(nativert.last_compile_report())
    assert "bf16 (rel err" in text and "100%" in text, text

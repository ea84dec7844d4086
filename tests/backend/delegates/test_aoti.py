"""The aoti delegate (AOTInductor), for real: whole and partial lowering, dynamic batch, the
constant-buffer weight life cycle, the Executor under concurrent updates, packages in a fresh
process, and a program mixing onnxruntime and aoti.

AOTInductor compiles cost seconds each, so compiled programs are module-scoped fixtures
shared by the tests (five compiles in all).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import nativert
from nativert.backend.delegates import aoti
from nativert.backend.delegates.aoti import AotiDelegate
from nativert.models import build
from tests.conftest import assert_close, run_in_threads
from tests.models import shift

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not AotiDelegate().is_available(), reason=AotiDelegate().is_available().reason
)


class SpectralHead(nn.Module):
    """Linear -> relu -> a custom op -> FFT magnitude -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = shift(torch.relu(self.a(x)))
        return self.b(torch.fft.rfft(h, dim=-1).abs())


def batch_dynamic(model, x):
    return torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))


@pytest.fixture(scope="module")
def mlp():
    model, (x,) = build("mlp")
    return model, x, batch_dynamic(model, x)


@pytest.fixture(scope="module")
def mlp_whole(mlp):
    model, x, ep = mlp
    return nativert.to_backend("aoti", ep)


@pytest.fixture(scope="module")
def mlp_partial(mlp):
    """gelu stays in PyTorch: two aoti regions around it."""
    model, x, ep = mlp
    partitioner = nativert.CapabilityPartitioner(["aoti"], exclude_ops=["aten::gelu"])
    return nativert.to_backend(ep, partitioner)


@pytest.fixture(scope="module")
def spectral():
    torch.manual_seed(0)
    model = SpectralHead().eval()
    x = torch.randn(3, 16)
    return model, x, batch_dynamic(model, x)


def test_aoti_is_opt_in():
    partitioner = nativert.CapabilityPartitioner()
    assert "aoti" not in [d.backend_id for d in partitioner.candidates()]
    assert "aoti" in nativert.list_delegates(available_only=True)


def test_unavailable_without_a_compiler(monkeypatch):
    monkeypatch.setattr(aoti, "_has_compiler", lambda: None)
    availability = AotiDelegate().is_available()
    assert not availability and "C++ compiler" in availability.reason
    with pytest.raises(nativert.DelegateUnavailableError, match=r"C\+\+ compiler"):
        nativert.CapabilityPartitioner(["aoti"]).candidates()


def test_whole_mlp_matches_eager_at_any_batch(mlp, mlp_whole):
    model, _, _ = mlp
    assert mlp_whole.backend_id == "aoti"
    with torch.no_grad():
        for batch in (1, 5, 33):
            x = torch.randn(batch, 32)
            assert_close(mlp_whole(x), model(x), what=f"batch {batch}")


def test_partial_mlp_matches_eager(mlp, mlp_partial):
    model, x, _ = mlp
    report = nativert.delegation_report(mlp_partial)
    assert [r.backend_id for r in report.regions] == ["aoti", "aoti"]
    assert report.reasons["aten.gelu.default"] == {"excluded by user": 1}
    with torch.no_grad():
        for batch in (2, 17):
            x = torch.randn(batch, 32)
            assert_close(nativert.Executor(mlp_partial)(x), model(x), what=f"batch {batch}")


def test_weights_stage_into_the_inactive_buffer_and_commit_swaps(mlp, mlp_whole):
    model, x, _ = mlp
    executor = AotiDelegate().load(
        mlp_whole.processed_bytes, mlp_whole.compile_specs, reference=mlp_whole.original_module
    )
    weights = dict(mlp_whole.original_module.state_dict)
    executor.init_weights(weights)
    with torch.no_grad():
        before = model(x)
        assert_close(executor.run([x])[0], before)

        doubled = {k: v * 2 for k, v in weights.items()}
        executor.process_weights(doubled)
        assert_close(executor.run([x])[0], before, what="staged only")
        executor.commit_weights()
        expected = torch.func.functional_call(model, doubled, (x,))
        assert_close(executor.run([x])[0], expected, what="after commit")

        bad = {**doubled, "fc1.weight": torch.zeros(3, 3)}
        with pytest.raises(nativert.WeightsError, match=r"'fc1.weight' has shape \(3, 3\)"):
            executor.process_weights(bad)
        missing = {k: v for k, v in doubled.items() if k != "fc2.bias"}
        with pytest.raises(nativert.WeightsError, match="missing \\['fc2.bias'\\]"):
            executor.process_weights(missing)
        assert_close(executor.run([x])[0], expected, what="after failed process")
        with pytest.raises(nativert.WeightsError, match="nothing staged"):
            executor.commit_weights()


def test_wrong_input_dtype_is_refused_with_its_index(mlp_whole):
    with pytest.raises(nativert.DelegateCallError, match=r"input 0 is torch.float64"):
        mlp_whole.executor.run([torch.randn(2, 32, dtype=torch.float64)])


def test_executor_updates_weights_while_serving_threads(mlp, mlp_partial):
    model, _, _ = mlp
    executor = nativert.Executor(mlp_partial)
    old = {k: v.clone() for k, v in executor.weights().items()}
    new = {k: torch.randn_like(v) for k, v in old.items()}
    x = torch.randn(4, 32)
    with torch.no_grad():
        outputs = {
            "old": torch.func.functional_call(model, old, (x,)),
            "new": torch.func.functional_call(model, new, (x,)),
        }
    stop = threading.Event()
    served = [0, 0, 0]

    def serve(k: int) -> None:
        with torch.no_grad():
            while not stop.is_set() or served[k] == 0:
                got = executor(x)
                assert any(torch.allclose(got, o, atol=1e-5) for o in outputs.values()), (
                    "a result mixed old and new weights"
                )
                served[k] += 1

    def update() -> None:
        try:
            for i in range(10):
                executor.update_weights(new if i % 2 == 0 else old)
        finally:
            stop.set()

    run_in_threads(*(lambda k=k: serve(k) for k in range(3)), update)
    assert all(served), served
    with torch.no_grad():
        assert_close(executor(x), outputs["new" if 9 % 2 == 0 else "old"])


def test_package_loads_and_runs_in_a_fresh_process(mlp, mlp_partial, tmp_path):
    model, _, _ = mlp
    path = tmp_path / "mlp_aoti.pt2"
    nativert.save(mlp_partial, path)
    with pytest.raises(nativert.PackageError, match="'aoti' payload, which is native code"):
        nativert.load(path)  # a library runs when it loads: only for files you trust
    code = textwrap.dedent(
        f"""
        import json, torch, nativert
        program = nativert.load({str(path)!r}, trust_native_code=True)
        x = torch.arange(5 * 32, dtype=torch.float32).reshape(5, 32) / 100
        with torch.no_grad():
            out = nativert.Executor(program)(x)
        regions = [m.backend_id for m in nativert.lowered_modules(program)]
        print(json.dumps({{"out": out.tolist(), "regions": regions}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["regions"] == ["aoti", "aoti"]
    x = torch.arange(5 * 32, dtype=torch.float32).reshape(5, 32) / 100
    with torch.no_grad():
        assert_close(torch.tensor(got["out"]), model(x))


def test_custom_op_and_fft_lowered_whole(spectral):
    model, x, ep = spectral
    lowered = nativert.to_backend("aoti", ep)
    with torch.no_grad():
        for batch in (3, 8):
            xb = torch.randn(batch, 16)
            assert_close(lowered(xb), model(xb), atol=1e-5, rtol=1e-4, what=f"batch {batch}")


def test_program_mixing_onnxruntime_and_aoti(spectral):
    model, x, ep = spectral
    partitioner = nativert.CapabilityPartitioner(["onnxruntime", "aoti"])
    program = nativert.to_backend(ep, partitioner)
    report = nativert.delegation_report(program)
    by_op = report.ops
    assert by_op["nativert_test.shift.default"] == {"aoti": 1}
    assert by_op["aten._fft_r2c.default"] == {"aoti": 1}
    assert by_op["aten.linear.default"] == {"onnxruntime": 2}
    with torch.no_grad():
        assert_close(nativert.Executor(program)(x), model(x), atol=1e-5, rtol=1e-4)
        assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mlp_on_cuda(mlp):
    model, x, _ = mlp
    model = model.to("cuda")
    x = x.to("cuda")
    ep = batch_dynamic(model, x)
    lowered = nativert.to_backend("aoti", ep)
    assert lowered.executor._device.type == "cuda"
    with torch.no_grad():
        assert_close(lowered(x), model(x), atol=1e-4, rtol=1e-4)

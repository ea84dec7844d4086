"""The tensorrt delegate: refuses clearly where TensorRT or CUDA is missing (every machine
runs that part), and runs for real where both exist."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import nativert
from nativert.backend.delegates.tensorrt import TensorRtDelegate
from nativert.models import build
from tests.conftest import assert_close

AVAILABLE = TensorRtDelegate().is_available()
needs_tensorrt = pytest.mark.skipif(not AVAILABLE, reason=f"tensorrt: {AVAILABLE.reason}")


@pytest.mark.skipif(bool(AVAILABLE), reason="TensorRT is available here")
def test_unavailable_says_why_and_is_never_chosen():
    assert "tensorrt" in nativert.list_delegates()
    assert "tensorrt" not in nativert.list_delegates(available_only=True)
    assert AVAILABLE.reason  # which of torch_tensorrt, tensorrt or CUDA is missing
    chosen = [d.backend_id for d in nativert.CapabilityPartitioner().candidates()]
    assert "tensorrt" not in chosen
    with pytest.raises(nativert.DelegateUnavailableError, match="delegate 'tensorrt'"):
        nativert.CapabilityPartitioner(["tensorrt"]).candidates()


@pytest.fixture(scope="module")
def cuda_mlp():
    model, (x,) = build("mlp")
    model, x = model.cuda(), x.cuda()
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    return model, x, ep


@needs_tensorrt
def test_mlp_runs_in_tensorrt_at_any_batch(cuda_mlp):
    model, x, ep = cuda_mlp
    program = nativert.to_backend(ep, nativert.AllNodePartitioner("tensorrt"))
    assert [m.backend_id for m in nativert.lowered_modules(program)] == ["tensorrt"]
    executor = nativert.Executor(program)
    with torch.no_grad():
        for batch in (1, 7, 64):
            xb = torch.randn(batch, 32, device="cuda")
            assert_close(executor(xb), model(xb), atol=1e-3, rtol=1e-3, what=f"batch {batch}")


@needs_tensorrt
def test_new_weights_rebuild_the_engine(cuda_mlp):
    model, x, ep = cuda_mlp
    lowered = nativert.to_backend("tensorrt", ep)
    executor = lowered.executor
    doubled = {k: v * 2 for k, v in lowered.original_module.state_dict.items()}
    executor.process_weights(doubled)
    with torch.no_grad():
        assert_close(executor.run([x])[0], model(x), atol=1e-3, rtol=1e-3, what="staged")
        executor.commit_weights()
        expected = torch.func.functional_call(model, doubled, (x,))
        assert_close(executor.run([x])[0], expected, atol=1e-3, rtol=1e-3, what="committed")

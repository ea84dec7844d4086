"""The eager reference delegate's executor: weights staging and commit, fresh outputs."""

from __future__ import annotations

import pytest
import torch

import nativert
from tests.conftest import assert_close
from tests.models import make


@pytest.fixture
def lowered():
    model, inputs = make("mlp")
    return model, inputs, nativert.to_backend("eager", torch.export.export(model, inputs))


def test_process_then_commit_switches_weights(lowered):
    model, (x,), lowered = lowered
    executor = lowered.executor
    new = {name: torch.randn_like(t) for name, t in model.state_dict().items()}
    executor.process_weights(new)
    assert_close(executor.run([x]), (model(x).detach(),), what="before commit")
    executor.commit_weights()
    model.load_state_dict(new)
    with torch.no_grad():
        assert_close(executor.run([x]), (model(x),), what="after commit")


def test_bad_weights_raise_and_change_nothing(lowered):
    model, (x,), lowered = lowered
    executor = lowered.executor
    bad = {name: t.clone() for name, t in model.state_dict().items()}
    bad["fc1.weight"] = torch.randn(3, 3)
    with pytest.raises(
        nativert.WeightsError, match=r"'fc1.weight' has shape \(3, 3\), expected \(64, 32\)"
    ):
        executor.process_weights(bad)
    with pytest.raises(nativert.WeightsError, match="nothing staged"):
        executor.commit_weights()
    missing = dict(bad)
    del missing["fc1.weight"]
    with pytest.raises(nativert.WeightsError, match=r"missing \['fc1.weight'\]"):
        executor.process_weights(missing)
    with torch.no_grad():
        assert_close(executor.run([x]), (model(x),))


def test_outputs_never_alias_inputs():
    class Passthrough(torch.nn.Module):
        def forward(self, x):
            return x, x.view(-1), x + 1

    x = torch.randn(2, 3)
    lowered = nativert.to_backend("eager", torch.export.export(Passthrough(), (x,)))
    a, b, c = lowered.executor.run([x])
    storages = {t.untyped_storage().data_ptr() for t in (x, a, b, c)}
    assert len(storages) == 4, "outputs must be fresh tensors"
    assert_close((a, b, c), (x, x.view(-1), x + 1))

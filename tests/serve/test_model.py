"""The serving view of a program, without Ray: which programs batch, and how batches split."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import nativert
from nativert.serve.model import PackageModel, RequestError, split_batch
from tests.conftest import assert_close


class Rows(torch.nn.Module):
    def forward(self, x, y):
        return x * 2 + y, x.sum(1)


class Pooled(torch.nn.Module):
    def forward(self, x):
        return x.sum(0)  # dim 0 is reduced: rows of different requests would mix


def model_for(module, args, dynamic):
    shapes = tuple({0: Dim("batch")} for _ in args) if dynamic else None
    return PackageModel(
        nativert.to_backend(torch.export.export(module, args, dynamic_shapes=shapes))
    )


@pytest.mark.parametrize(
    ("module", "dynamic", "enabled", "reason"),
    [
        (Rows(), True, True, "dim 0 is dynamic"),
        (Rows(), False, False, "dim 0 is static"),
        (Pooled(), True, False, "not every input and output"),
    ],
    ids=["rows", "static", "pooled"],
)
def test_batching_only_where_every_input_and_output_shares_dim_0(module, dynamic, enabled, reason):
    args = (torch.randn(3, 4),) if isinstance(module, Pooled) else (torch.randn(3, 4),) * 2
    batching = model_for(module, args, dynamic).batching
    assert batching.enabled is enabled and reason in batching.reason


def test_split_batch_gives_each_request_its_rows():
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    with torch.no_grad():
        outputs = Rows()(x, y)
        parts = split_batch(outputs, [1, 3, 2])
        assert_close(parts[1], Rows()(x[1:4], y[1:4]))
    assert [p[0].shape[0] for p in parts] == [1, 3, 2]


def test_json_inputs_take_the_inputs_dtype_and_are_checked():
    model = model_for(Rows(), (torch.randn(3, 4),) * 2, True)
    x, y = model.decode_json(
        b'{"inputs": [[[1, 2, 3, 4]], {"data": [1, 2, 3, 4], "shape": [1, 4]}]}'
    )
    assert x.dtype == y.dtype == torch.float32 and y.shape == (1, 4)
    with pytest.raises(RequestError, match=r"input 'y' has size 3 in dimension 1, expected 4"):
        model.arguments([x, torch.ones(1, 3)])
    with pytest.raises(RequestError, match="not JSON"):
        model.decode_json(b"{")


def test_serving_without_the_serve_extra_says_which_extra_to_install(tmp_path):
    """A plain `pip install nativert` has no Ray: `nativert serve` must say what to install,
    not fail on an import (simulated: `ray` blocked in sys.modules)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "from nativert import cli\n"
        "sys.exit(cli.main(['serve', 'model.pt2']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "nativert serve: error: serving needs Ray Serve and safetensors, and ray is not " in (
        result.stderr
    ), result.stderr
    assert "pip install 'nativert[serve]'" in result.stderr

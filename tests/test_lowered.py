"""LoweredBackendModule: data until a runner needs it, and clear errors for wrong inputs on
every path that reaches a delegate (its own call, a graph's call_delegate, .module())."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nativert
from tests.conftest import assert_close
from tests.models import make


def test_lowering_builds_each_executor_once_and_calls_reuse_it(count_loads):
    """to_backend builds the executor (so a payload the runtime refuses falls back while it
    still can); .module() then runs on it and builds nothing."""
    counted_loads = count_loads("onnxruntime")
    model, inputs = make("mlp")
    program = nativert.to_backend(torch.export.export(model, inputs), cache_dir=None)
    (lowered,) = nativert.lowered_modules(program)
    assert lowered.backend_id == "onnxruntime" and isinstance(lowered.processed_bytes, bytes)
    assert lowered.weight_names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                                    "fc3.weight", "fc3.bias")  # fmt: skip
    assert counted_loads == ["onnxruntime"]
    module = program.module()
    with torch.no_grad():
        assert_close(module(*inputs), model(*inputs))
        assert_close(module(*inputs), model(*inputs))
    assert counted_loads == ["onnxruntime"]


@pytest.fixture(scope="module")
def mlp_program():
    model, inputs = make("mlp")
    return nativert.to_backend(torch.export.export(model, inputs))


BAD_INPUTS = [
    (torch.randn(4, 32, 1), r"input 'x' has rank 3 \(shape \(4, 32, 1\)\), expected rank 2"),
    (np.ones((4, 32), np.float32), r"input 'x' must be a Tensor, got ndarray"),
    ([[1.0] * 32] * 4, r"input 'x' must be a Tensor, got list"),
    (torch.randn(4, 32, dtype=torch.float64), r"input 'x' has dtype torch.float64, expected "),
    (torch.randn(4, 31), r"input 'x' has size 31 in dimension 1, expected 32"),
]


@pytest.mark.parametrize(
    ("x", "message"), BAD_INPUTS, ids=["rank", "numpy", "list", "dtype", "static_dim"]
)
def test_wrong_inputs_to_a_lowered_module_name_the_segment_and_input(mlp_program, x, message):
    (lowered,) = nativert.lowered_modules(mlp_program)
    weights = [lowered.original_module.state_dict[n] for n in lowered.weight_names]
    with pytest.raises(
        nativert.DelegateCallError,
        match=r"segment 'onnxruntime_0' \(delegate 'onnxruntime'\): " + message,
    ):
        lowered(*weights, x)


@pytest.mark.parametrize(("x", "message"), BAD_INPUTS[::3], ids=["rank", "dtype"])
def test_wrong_inputs_through_module_name_the_segment_and_input(mlp_program, x, message):
    # (a wrong static size is caught first by torch's own guard on .module(), naming x)
    with pytest.raises(nativert.DelegateCallError, match=r"segment 'onnxruntime_0'.*" + message):
        mlp_program.module()(x)


@pytest.mark.parametrize(
    ("x", "message"), BAD_INPUTS, ids=["rank", "numpy", "list", "dtype", "static_dim"]
)
def test_wrong_inputs_to_a_whole_program_module(x, message):
    model, inputs = make("mlp")
    whole = nativert.to_backend("onnxruntime", torch.export.export(model, inputs))
    with pytest.raises(nativert.DelegateCallError, match=message):
        whole(x)

"""The pass manager: ordered, timed, verified, and clear about which pass broke what."""

from __future__ import annotations

import pytest
import torch

from nativert import passes
from nativert.passes import PassError, PassResult, run_passes
from tests.models import make
from tests.passes.test_passes import functional


@pytest.fixture
def program_and_inputs():
    model, inputs = make("mlp")
    return functional(model, *inputs), inputs


def swap_relu_for_sigmoid(program):
    """A wrong pass: it changes values but keeps the program valid."""
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.relu.default:
            node.target = torch.ops.aten.sigmoid.default
    gm.recompile()
    return PassResult(program, modified=True)


def explode(program):
    raise ValueError("boom")


def test_runs_in_order_and_times_each_pass(program_and_inputs):
    program, inputs = program_and_inputs
    result = run_passes(program, passes.INFERENCE_PIPELINE, verify=True, example_inputs=inputs)
    assert [r.name for r in result.records] == [name for name, _ in passes.INFERENCE_PIPELINE]
    assert all(r.seconds >= 0 for r in result.records)
    assert "fold_constants" in str(result)


def test_failure_names_the_pass_and_what_ran_before(program_and_inputs):
    program, _ = program_and_inputs
    pipeline = [passes.remove_noop_ops, ("explode", explode)]
    with pytest.raises(
        PassError,
        match=r"pass 'explode' failed after \['remove_noop_ops'\]: "
        r"ValueError: boom",
    ):
        run_passes(program, pipeline)


def test_verify_catches_a_pass_that_changes_values(program_and_inputs):
    program, inputs = program_and_inputs
    pipeline = [passes.canonicalize_views, swap_relu_for_sigmoid]
    with pytest.raises(
        PassError,
        match=r"output 0 changed after pass 'swap_relu_for_sigmoid' "
        r"\(which ran after \['canonicalize_views'\]\)",
    ):
        run_passes(program, pipeline, verify=True, example_inputs=inputs)


def test_verify_spot_check_does_not_advance_state():
    model, inputs = make("counter")
    program = functional(model, *inputs)
    steps = program.state_dict["steps"].clone()
    run_passes(program, passes.DEFAULT_PIPELINE, verify=True, example_inputs=inputs)
    assert torch.equal(program.state_dict["steps"], steps)


def test_pass_must_return_pass_result(program_and_inputs):
    program, _ = program_and_inputs
    with pytest.raises(PassError, match="returned ExportedProgram, not PassResult"):
        run_passes(program, [("bad", lambda p: p)])

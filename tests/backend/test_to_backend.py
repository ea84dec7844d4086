"""to_backend(ep, partitioner): numerics, program validity, weights, mutations, errors."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch.export import Dim

import nativert
from nativert.backend.delegates.eager import EagerDelegate
from tests.conftest import assert_close, assert_same_gradients
from tests.models import make


def lower(model, inputs, partitioner=None, **export_kwargs):
    program = torch.export.export(model, inputs, **export_kwargs)
    return nativert.to_backend(program, partitioner)


def delegate_count(program) -> int:
    return len(nativert.delegate_nodes(program))


class NoSinDelegate(EagerDelegate):
    """A real delegate (runs the reference graph) whose support table lacks aten.sin."""

    backend_id = "eager_no_sin"

    def check_support(self, node):
        if node.target is torch.ops.aten.sin.default:
            return "aten.sin.default is not in this delegate's table"
        return None


@pytest.mark.parametrize("name", ["mlp", "convnet", "multi_output", "split_by_sin"])
def test_lowered_program_matches_eager(name):
    model, inputs = make(name)
    delegated = lower(model, inputs)
    delegated.validate()
    assert delegate_count(delegated) == 1
    remaining = [
        n
        for n in delegated.graph.nodes
        if n.op == "call_function" and n.target not in (operator.getitem, nativert.call_delegate)
    ]
    assert remaining == [], f"nodes left outside the delegate: {remaining}"
    with torch.no_grad():
        assert_close(delegated.module()(*inputs), model(*inputs))


def test_caller_program_is_untouched():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    before = [n.format_node() for n in program.graph.nodes]
    nativert.to_backend(program)
    assert [n.format_node() for n in program.graph.nodes] == before


def test_buffer_updated_in_forward_advances_state():
    model, inputs = make("counter")
    reference, _ = make("counter")
    delegated = lower(model, inputs).module()
    with torch.no_grad():
        for step in range(1, 4):
            assert_close(delegated(*inputs), reference(*inputs), what=f"call {step}")
            assert delegated.steps.tolist() == [float(step)] * 4


def test_mutated_buffer_stays_at_top_level():
    model, inputs = make("counter")
    delegated = lower(model, inputs)
    (lowered,) = nativert.lowered_modules(delegated)
    segment_sig = lowered.original_module.graph_signature
    assert "steps" not in segment_sig.buffers, "a mutated buffer must not be owned by a delegate"
    assert segment_sig.buffers_to_mutate == {}
    assert list(delegated.graph_signature.buffers_to_mutate.values()) == ["steps"]


def test_weights_used_by_one_region_move_into_it_without_copies():
    model, inputs = make("mlp")
    delegated = lower(model, inputs)
    (lowered,) = nativert.lowered_modules(delegated)
    owned = lowered.original_module.state_dict
    assert sorted(owned) == sorted(name for name, _ in model.named_parameters())
    for name, tensor in owned.items():
        assert tensor.data_ptr() == delegated.state_dict[name].data_ptr(), name


def test_dynamic_batch():
    model, inputs = make("mlp")
    delegated = lower(model, inputs, dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    delegated.validate()
    runnable = delegated.module()
    for batch in (1, 7, 64):
        x = torch.randn(batch, 32)
        with torch.no_grad():
            assert_close(runnable(x), model(x), what=f"batch {batch}")


def test_dynamic_batch_conv_net_module_takes_every_batch_the_export_allowed():
    """Compiling a segment traces it again on the shared ShapeEnv, which once left a
    `batch < 16` guard that `.module()` enforced; the program keeps its own guards."""
    model, inputs = make("convnet")
    program = torch.export.export(model, inputs, dynamic_shapes=({0: Dim("batch")},))
    delegated = nativert.to_backend(program)
    assert delegated._guards_code == program._guards_code
    runnable = delegated.module()
    for batch in (2, 16, 33):
        x = torch.randn(batch, *inputs[0].shape[1:])
        with torch.no_grad():
            assert_close(runnable(x), model(x), atol=1e-5, rtol=1e-4, what=f"batch {batch}")


def test_unsupported_op_splits_into_two_partitions(registered):
    registered(NoSinDelegate())
    model, inputs = make("split_by_sin")
    delegated = lower(model, inputs, nativert.CapabilityPartitioner(["eager_no_sin"]))
    delegated.validate()
    nodes = nativert.delegate_nodes(delegated)
    assert len(nodes) == 2
    outside = [
        n.target
        for n in delegated.graph.nodes
        if n.op == "call_function" and n.target not in (operator.getitem, nativert.call_delegate)
    ]
    assert outside == [torch.ops.aten.sin.default]
    sin = next(n for n in delegated.graph.nodes if n.target is torch.ops.aten.sin.default)
    assert "not in this delegate's table" in sin.meta["nativert_not_delegated"]
    with torch.no_grad():
        assert_close(delegated.module()(*inputs), model(*inputs))


def test_exclude_ops_keeps_op_in_pytorch():
    model, inputs = make("split_by_sin")
    partitioner = nativert.CapabilityPartitioner(exclude_ops=["aten::relu"])
    delegated = lower(model, inputs, partitioner)
    relu = next(n for n in delegated.graph.nodes if n.target is torch.ops.aten.relu.default)
    assert relu.meta["nativert_not_delegated"] == "excluded by user"
    assert delegate_count(delegated) == 2
    with torch.no_grad():
        assert_close(delegated.module()(*inputs), model(*inputs))


def test_min_block_size_sends_small_regions_back():
    model, inputs = make("split_by_sin")
    partitioner = nativert.CapabilityPartitioner(
        ["eager"], exclude_ops=["aten::relu"], min_block_size=3
    )
    delegated = lower(model, inputs, partitioner)
    # relu splits the graph: {permute, addmm} (2 compute nodes) and {sin, permute, addmm, add}.
    assert delegate_count(delegated) == 1
    addmm = next(n for n in delegated.graph.nodes if n.target is torch.ops.aten.addmm.default)
    assert addmm.meta["nativert_not_delegated"] == "region below min_block_size=3"
    (lowered,) = nativert.lowered_modules(delegated)
    inner = sorted(
        str(n.target) for n in lowered.original_module.graph.nodes if n.op == "call_function"
    )
    assert inner == [
        "aten.add.Tensor",
        "aten.addmm.default",
        "aten.permute.default",
        "aten.sin.default",
    ]
    with torch.no_grad():
        assert_close(delegated.module()(*inputs), model(*inputs))


def test_delegated_program_can_be_lowered_again():
    model, inputs = make("split_by_sin")
    once = lower(model, inputs, nativert.CapabilityPartitioner(exclude_ops=["aten::sin"]))
    twice = nativert.to_backend(once, compare_with_pytorch=False)
    twice.validate()
    # The existing delegates are kept; the sin left in PyTorch is delegated now.
    assert delegate_count(twice) == 3
    with torch.no_grad():
        assert_close(twice.module()(*inputs), model(*inputs))


def test_run_decompositions_on_delegated_program():
    model, inputs = make("convnet")
    delegated = lower(model, inputs)
    again = delegated.run_decompositions()
    again.validate()
    assert delegate_count(again) == 1
    with torch.no_grad():
        assert_close(again.module()(*inputs), model(*inputs))


def test_placeholder_renamed_by_fusion_keeps_program_valid():
    # nn.Linear's argument is called `input`; fusing renames that placeholder to `input_1`.
    model, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
    program = lower(model, (x,))
    program.validate()
    assert list(program.graph_signature.user_inputs) == ["input_1"]
    with torch.no_grad():
        assert_close(program.module()(x), model(x))


class CloneThenRelu(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x.clone()) * 2


def inner_ops(program) -> list:
    return [
        n.target
        for m in nativert.lowered_modules(program)
        for n in m.original_module.graph.nodes
        if n.op == "call_function"
    ]


def test_default_pipeline_runs_before_partitioning():
    x = torch.randn(3)
    program = lower(CloneThenRelu(), (x,))
    assert torch.ops.aten.clone.default not in inner_ops(program)  # remove_noop_ops ran


def test_passes_empty_runs_no_passes_but_still_decomposes_to_functional_segments():
    x = torch.randn(3)
    program = nativert.to_backend(torch.export.export(CloneThenRelu(), (x,)), passes=[])
    assert torch.ops.aten.clone.default in inner_ops(program)
    model, inputs = make("counter")
    program = nativert.to_backend(torch.export.export(model, inputs), passes=[])
    assert list(program.graph_signature.buffers_to_mutate.values()) == ["steps"]
    reference, _ = make("counter")
    with torch.no_grad():
        runnable = program.module()
        for step in range(2):
            assert_close(runnable(*inputs), reference(*inputs), what=f"call {step}")


class MutatesInput(torch.nn.Module):
    """Its argument is called `input`, which graph copies and fusion rename to `input_1`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, input):
        out = self.fc(input * 2)  # eager saves input * 2, never input itself
        input.add_(1.0)
        return out


def check_trains_like_eager(runnable, model):
    reference = copy.deepcopy(model)  # .module() shares the model's Parameters
    x = torch.randn(2, 3)
    x1, x2 = x.clone(), x.clone()
    runnable(x1).sum().backward()
    reference(x2).sum().backward()
    assert torch.equal(x1, x2)
    assert_same_gradients(runnable, reference)


def test_mutated_input_named_input_trains_like_eager():
    model = MutatesInput()
    program = torch.export.export(model, (torch.randn(2, 3),))
    check_trains_like_eager(nativert.to_backend(program).module(), model)


def test_lowering_knows_a_mutated_input_that_fusion_renamed():
    # Lowering a program straight from decomposition: fusing renames `input` to `input_1`,
    # and the lowered module must still know that the program mutates it after the call.
    from nativert.backend.lowering import lower_tagged_program
    from nativert.passes import decompose_to_core_aten

    model = MutatesInput()
    program = decompose_to_core_aten(torch.export.export(model, (torch.randn(2, 3),))).program
    assert "input" in program.graph_signature.user_inputs
    result = nativert.CapabilityPartitioner(["eager"]).partition(program)
    lowered = lower_tagged_program(result.tagged_program, result.tags)
    (segment,) = nativert.lowered_modules(lowered)
    assert segment.mutated_arg_indices == {2}
    check_trains_like_eager(lowered.module(), model)

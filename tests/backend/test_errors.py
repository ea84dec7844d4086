"""Bad input gets a clear error that names what is wrong."""

from __future__ import annotations

import pytest
import torch

import nativert
from nativert.partitioner.base import TAG_KEY, DelegationSpec, PartitionResult
from tests.models import make


class TagNodes:
    """A partitioner that tags whatever `choose(program)` returns."""

    def __init__(self, choose):
        self.choose = choose

    def partition(self, program):
        for node in self.choose(program):
            node.meta[TAG_KEY] = "t0"
        return PartitionResult(program, {"t0": DelegationSpec("eager")})


def test_unknown_backend_lists_known_ids():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    with pytest.raises(
        nativert.UnknownDelegateError, match=r"'nope'.*registered delegates: .*eager"
    ):
        nativert.to_backend("nope", program)
    with pytest.raises(nativert.UnknownDelegateError, match=r"registered delegates: .*eager"):
        nativert.CapabilityPartitioner(["nope"])


def test_partitioner_tagging_output_node_is_rejected():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    partitioner = TagNodes(lambda p: [p.graph.output_node()])
    with pytest.raises(nativert.PartitionError, match="tagged the output node"):
        nativert.to_backend(program, partitioner)


def test_partitioner_tagging_user_input_is_rejected():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    partitioner = TagNodes(lambda p: [n for n in p.graph.nodes if n.name == "x"])
    with pytest.raises(nativert.PartitionError, match="tagged user input 'x'"):
        nativert.to_backend(program, partitioner)


def test_partitioner_changing_the_graph_is_rejected():
    class Renamer:
        def partition(self, program):
            node = next(n for n in program.graph.nodes if n.op == "call_function")
            node.name = "renamed"
            return PartitionResult(program, {})

    model, inputs = make("mlp")
    with pytest.raises(nativert.PartitionError, match="Renamer changed the program"):
        nativert.to_backend(torch.export.export(model, inputs), Renamer())


def test_region_that_would_create_a_cycle_is_rejected():
    model, inputs = make("split_by_sin")
    program = torch.export.export(model, inputs)

    def ends_around_sin(p):
        # relu -> sin -> addmm: tagging relu and addmm but not sin leaves a path that exits
        # the region and comes back.
        sin = next(n for n in p.graph.nodes if n.target is torch.ops.aten.sin.default)
        return [sin.args[0], next(iter(sin.users))]

    with pytest.raises(nativert.PartitionError, match="fusing would create a cycle"):
        nativert.to_backend(program, TagNodes(ends_around_sin))


def test_lowered_module_called_with_wrong_number_of_inputs():
    model, inputs = make("mlp")
    lowered = nativert.to_backend("eager", torch.export.export(model, inputs))
    with pytest.raises(nativert.DelegateCallError, match="expects inputs structured as"):
        lowered(*inputs, *inputs)
    view = lowered.graph_view()
    with pytest.raises(nativert.DelegateCallError, match=r"takes 7 arguments \(6 weights"):
        view(*inputs)


def test_call_delegate_rejects_non_lowered_module():
    with pytest.raises(nativert.DelegateCallError, match="must be a nativert LoweredBackendModule"):
        nativert.call_delegate(torch.nn.Linear(2, 2), torch.randn(2))


def test_whole_program_lowering_names_unsupported_nodes(registered):
    from tests.backend.test_to_backend import NoSinDelegate

    registered(NoSinDelegate())
    model, inputs = make("split_by_sin")
    with pytest.raises(nativert.LoweringError, match=r"sin.*not in this delegate's table"):
        nativert.to_backend("eager_no_sin", torch.export.export(model, inputs))


def test_partitioner_must_be_a_partitioner():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    with pytest.raises(TypeError, match=r"write to_backend\('eager', program\)"):
        nativert.to_backend(program, "eager")
    with pytest.raises(TypeError, match=r"partition\(program\) method, got int"):
        nativert.to_backend(program, 3)

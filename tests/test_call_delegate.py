"""call_delegate through every dispatch case: export, make_fx, functionalize, compile, autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import nativert
from nativert.call_delegate import HOP_NAME
from tests.conftest import assert_close, assert_same_gradients, run_in_threads
from tests.models import TrainBN, make


class Wrapper(nn.Module):
    """User code that calls a lowered module and does more work around it."""

    def __init__(self, lowered: nn.Module) -> None:
        super().__init__()
        self.lowered = lowered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lowered(x)) * 2


def hop_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [
        n for n in graph.nodes if n.op == "call_function" and n.target is nativert.call_delegate
    ]


def lowered_mlp(dtype=torch.float32, *, dynamic_batch: bool = False):
    model, (x,) = make("mlp")
    model, x = model.to(dtype), x.to(dtype)
    shapes = ({0: torch.export.Dim("batch", max=64)},) if dynamic_batch else None
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    return model, x, nativert.to_backend("eager", program)


@pytest.fixture
def mlp():
    return lowered_mlp()


def test_hop_is_registered_under_unique_name():
    assert torch.ops.higher_order.nativert_call_delegate is nativert.call_delegate
    assert HOP_NAME != "executorch_call_delegate"


def test_whole_program_lowered_module_runs_the_program(mlp):
    model, x, lowered = mlp
    assert isinstance(lowered, nativert.LoweredBackendModule)
    assert type(lowered).__name__ == "LoweredBackendModule"  # torch's verifier requires it
    assert isinstance(lowered.processed_bytes, bytes) and isinstance(lowered.compile_specs, list)
    with torch.no_grad():
        assert_close(lowered(x), model(x))


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_export_of_wrapper_has_one_call_delegate_node(mlp, strict):
    model, x, lowered = mlp
    wrapper = Wrapper(lowered)
    program = torch.export.export(wrapper, (x,), strict=strict)
    program.validate()
    (node,) = hop_nodes(program.graph)
    assert node.args[0].op == "get_attr"
    held = getattr(program.graph_module, node.args[0].target)
    assert isinstance(held, nativert.LoweredBackendModule)
    assert not held.owns_weights and list(held.parameters()) == []
    # the lowered module's weights are lifted as the wrapper's parameters
    assert sorted(program.graph_signature.parameters) == sorted(
        f"lowered.{name}" for name, _ in lowered.named_parameters()
    )
    with torch.no_grad():
        assert_close(program.module()(x), torch.tanh(model(x)) * 2)


def test_run_decompositions_keeps_the_delegate(mlp):
    model, x, lowered = mlp
    program = torch.export.export(Wrapper(lowered), (x,)).run_decompositions()
    program.validate()
    assert len(hop_nodes(program.graph)) == 1
    with torch.no_grad():
        assert_close(program.module()(x), torch.tanh(model(x)) * 2)


def test_make_fx_real(mlp):
    model, x, lowered = mlp
    traced = make_fx(Wrapper(lowered))(x)
    (node,) = hop_nodes(traced.graph)
    assert node.args[0].op == "get_attr"
    with torch.no_grad():
        assert_close(traced(x), torch.tanh(model(x)) * 2)


@pytest.mark.parametrize("mode", ["fake", "symbolic"])
def test_make_fx_fake_and_symbolic(mode):
    # A segment runs at the sizes it was exported for: a dynamic batch, to run at another.
    model, x, lowered = lowered_mlp(dynamic_batch=True)
    wrapper = Wrapper(lowered)
    params = dict(wrapper.named_parameters())

    def fn(params, x):
        return torch.func.functional_call(wrapper, params, (x,))

    traced = make_fx(fn, tracing_mode=mode)(params, x)
    (node,) = hop_nodes(traced.graph)
    val = node.meta["val"][0]
    assert val.shape[1] == 10
    if mode == "symbolic":
        assert isinstance(val.shape[0], torch.SymInt), "batch dim must stay symbolic"
        x = torch.randn(9, 32)
    with torch.no_grad():
        assert_close(traced(params, x), torch.tanh(model(x)) * 2)


def test_functionalize(mlp):
    model, x, lowered = mlp
    functional = torch.func.functionalize(Wrapper(lowered))
    with torch.no_grad():
        assert_close(functional(x), torch.tanh(model(x)) * 2)
    traced = make_fx(functional)(x)
    assert len(hop_nodes(traced.graph)) == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_with_real_weights(mlp, backend):
    model, x, lowered = mlp
    torch._dynamo.reset()
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(backend)(gm, example_inputs)

    compiled = torch.compile(Wrapper(lowered), fullgraph=True, backend=count_graphs)
    with torch.no_grad():
        assert_close(compiled(x), torch.tanh(model(x)) * 2)
    assert len(graphs) == 1
    assert len(hop_nodes(graphs[0].graph)) == 1


def test_compile_trains_through_lowered_module(mlp):
    model, x, lowered = mlp
    reference = copy.deepcopy(model)  # the lowered module may share the model's Parameters
    torch._dynamo.reset()
    compiled = torch.compile(Wrapper(lowered), fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    Wrapper(reference)(x).sum().backward()
    # The lowered module names its weights after its placeholders (fc1_weight): by order.
    pairs = zip(lowered.named_parameters(), reference.parameters(), strict=True)
    for (name, p), q in pairs:
        assert p.grad is not None, f"no gradient reached {name}"
        assert_close(p.grad, q.grad, what=f"grad {name}")


# -- autograd ----------------------------------------------------------------------------


def test_gradients_match_eager_for_inputs_and_parameters():
    model, inputs = make("split_by_sin")
    reference = copy.deepcopy(model)  # .module() shares the model's Parameters
    program = torch.export.export(model, inputs)
    delegated = nativert.to_backend(
        program, nativert.CapabilityPartitioner(exclude_ops=["aten::sin"])
    ).module()
    assert len(hop_nodes(delegated.graph)) == 2  # both linears' grads come from call_delegate
    x1 = inputs[0].clone().requires_grad_()
    x2 = inputs[0].clone().requires_grad_()
    (delegated(x1) ** 2).sum().backward()
    (reference(x2) ** 2).sum().backward()
    assert_close(x1.grad, x2.grad, what="x.grad")
    assert_same_gradients(delegated, reference)


def test_gradcheck_and_gradgradcheck_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    lowered = nativert.to_backend("eager", torch.export.export(model, (x,)))
    weights = [getattr(lowered, a) for a in lowered._weight_attrs]
    view = lowered.graph_view()

    def fn(*flat):
        return nativert.call_delegate(view, *flat)

    flat = [w.detach().clone().requires_grad_() for w in weights]
    flat.append(x.clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, flat)
    assert torch.autograd.gradgradcheck(fn, flat)


def test_double_backward_matches_eager():
    model, x, lowered = lowered_mlp(torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (g1,) = torch.autograd.grad(lowered(x1).pow(2).sum(), x1, create_graph=True)
    (g2,) = torch.autograd.grad(model(x2).pow(2).sum(), x2, create_graph=True)
    g1.sum().backward()
    g2.sum().backward()
    assert_close(x1.grad, x2.grad, atol=1e-10, what="second-order grad")


def test_training_step_with_batchnorm_in_train_mode_matches_eager():
    torch.manual_seed(0)
    model = TrainBN().train()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    # eager: ORT has no train-mode batch norm, and a train-mode batch norm left in PyTorch
    # cannot backward twice through ep.module() in torch 2.13 (plain exported programs too).
    partitioner = nativert.CapabilityPartitioner(["eager"])
    delegated = nativert.to_backend(torch.export.export(model, (x,)), partitioner).module()
    opt = torch.optim.SGD(delegated.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(3):
        for module, optimizer in ((delegated, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            module(x).square().mean().backward()
            optimizer.step()
        what = f"step {step}"
        assert_close(
            dict(delegated.named_parameters()), dict(reference.named_parameters()), what=what
        )
        assert_close(delegated.bn.running_mean, reference.bn.running_mean, what=what)
        assert_close(delegated.bn.running_var, reference.bn.running_var, what=what)


def test_delegate_sees_parameters_updated_in_place():
    model, x, lowered = lowered_mlp()
    with torch.no_grad():
        before = lowered(x)
        lowered.fc3_bias.add_(1.0)
        model.fc3.bias.add_(1.0)
        after = lowered(x)
    assert_close(after, model(x))
    assert not torch.allclose(before, after)


def test_deepcopy_shares_payload_but_copies_weights_and_runtime(mlp):
    model, x, lowered = mlp
    clone = copy.deepcopy(lowered)
    assert clone.processed_bytes is lowered.processed_bytes
    assert clone.original_module is lowered.original_module
    assert clone._runtime is not lowered._runtime  # copies never rebind each other's executor
    assert clone.fc1_weight is not lowered.fc1_weight
    view = lowered.graph_view()
    assert copy.deepcopy(view) is view
    with torch.no_grad():
        clone.fc3_bias.add_(1.0)
        assert_close(lowered(x), model(x))
        assert not torch.allclose(clone(x), lowered(x))


def test_inference_tensor_weights_work_and_in_place_changes_are_seen(mlp):
    model, x, lowered = mlp
    view = lowered.graph_view()
    with torch.inference_mode():
        weights = [getattr(lowered, a).detach().clone() for a in lowered._weight_attrs]
        first = nativert.call_delegate(view, *weights, x)
        weights[-1].add_(1.0)  # no version counter: the runtime must not trust a cache
        second = nativert.call_delegate(view, *weights, x)
    with torch.no_grad():
        assert_close(first[0], model(x))
        assert_close(second[0], model(x) + 1.0)


def test_deep_copies_with_different_weights_never_mix_under_threads():
    model, (x,) = make("mlp")
    a = nativert.to_backend("onnxruntime", torch.export.export(model, (x,)))
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.neg_()
        expected_a, expected_b = a(x), b(x)
    assert not torch.allclose(expected_a, expected_b)

    def call(module, expected):
        with torch.no_grad():
            for _ in range(300):
                assert torch.allclose(module(x), expected, atol=1e-6), (
                    "a result used the other copy's weights"
                )

    run_in_threads(lambda: call(a, expected_a), lambda: call(b, expected_b))

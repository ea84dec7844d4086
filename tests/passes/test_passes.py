"""Each pass: does its job on a graph built for it, leaves other graphs alone, keeps values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nativert
from nativert import passes
from nativert.passes import decompose_to_core_aten
from tests.conftest import assert_close
from tests.models import Counter, make

aten = torch.ops.aten


def functional(model: nn.Module, *inputs: torch.Tensor, **kwargs):
    return decompose_to_core_aten(torch.export.export(model, inputs), **kwargs).program


def ops(program) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def check_values(before, after, inputs, **tol):
    with torch.no_grad():
        assert_close(after.module()(*inputs), before.module()(*inputs), **tol)


class Noops(nn.Module):
    def forward(self, x):
        y = x.clone() + 1
        w = y.reshape(y.shape).view(4, 6)
        return w[:, 0:].expand(4, 6).detach() * 2


class Views(nn.Module):
    def forward(self, x):
        return (x + 1).view(2, 12).view(24).view(4, 6) * 2


class Repeats(nn.Module):
    def forward(self, x):
        return torch.sin(x) * torch.sin(x) + torch.cos(x)


class RandomTwice(nn.Module):
    def forward(self, x):
        return torch.rand_like(x) + torch.rand_like(x)


class WeightMath(nn.Module):
    """Weight-only expressions (w * 2, exp(b)) next to activations."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return x @ (self.w * 2).t() + self.b.exp()


X = torch.randn(4, 6)


@pytest.fixture
def mlp_program():
    model, inputs = make("mlp")
    return functional(model, *inputs), inputs


ALL_PASSES = [
    passes.remove_noop_ops,
    passes.canonicalize_views,
    passes.eliminate_common_subexpressions,
    passes.eliminate_dead_code,
    passes.fuse_conv_batchnorm,
    passes.fold_constants,
]


@pytest.mark.parametrize("fn", ALL_PASSES, ids=lambda f: f.__name__)
def test_pass_leaves_unrelated_graph_unchanged(fn, mlp_program):
    program, _ = mlp_program
    result = fn(program)
    assert result.modified is False
    assert result.program is program


@pytest.mark.parametrize("fn", ALL_PASSES, ids=lambda f: f.__name__)
def test_pass_does_not_touch_its_input(fn):
    model, inputs = make("convnet")
    program = functional(model, *inputs)
    before = [n.format_node() for n in program.graph.nodes]
    fn(program)
    assert [n.format_node() for n in program.graph.nodes] == before


def test_remove_noop_ops():
    program = functional(Noops(), X)
    assert {aten.clone.default, aten.alias.default, aten.expand.default} & set(ops(program))
    result = passes.remove_noop_ops(program)
    assert result.modified
    left = set(ops(result.program))
    for op in (aten.clone.default, aten.alias.default, aten.expand.default, aten.slice.Tensor):
        assert op not in left, op
    assert ops(result.program).count(aten.view.default) == 0  # both views were to (4, 6)
    result.program.validate()
    check_values(program, result.program, (X,))


def test_remove_noop_ops_keeps_an_output_distinct_from_its_input():
    class CloneOut(nn.Module):
        def forward(self, x):
            return x.clone()

    program = functional(CloneOut(), X)
    result = passes.remove_noop_ops(program)
    assert result.modified is False
    out = result.program.module()(X)
    assert out.data_ptr() != X.data_ptr()


def test_canonicalize_views_collapses_chain():
    program = functional(Views(), X)
    assert ops(program).count(aten.view.default) == 3
    result = passes.canonicalize_views(program)
    assert result.modified
    assert ops(result.program).count(aten.view.default) == 1
    check_values(program, result.program, (X,))


def test_cse_merges_identical_pure_ops():
    program = functional(Repeats(), X)
    assert ops(program).count(aten.sin.default) == 2
    result = passes.eliminate_common_subexpressions(program)
    assert result.modified
    assert ops(result.program).count(aten.sin.default) == 1
    check_values(program, result.program, (X,))


def test_cse_never_merges_random_ops():
    program = functional(RandomTwice(), X)
    n = ops(program).count(aten.rand_like.default) or ops(program).count(aten.rand.default)
    assert n == 2
    result = passes.eliminate_common_subexpressions(program)
    assert result.modified is False


def test_dead_code_is_removed(mlp_program):
    program, inputs = mlp_program
    gm = copy.deepcopy(program.graph_module)
    x = next(n for n in gm.graph.nodes if n.name == "x")
    with gm.graph.inserting_after(x):
        dead = gm.graph.call_function(aten.sin.default, (x,))
    dead.meta["val"] = x.meta["val"]
    gm.recompile()
    from nativert._program import rebuild_program

    with_dead = rebuild_program(program, gm)
    result = passes.eliminate_dead_code(with_dead)
    assert result.modified
    assert aten.sin.default not in ops(result.program)
    check_values(program, result.program, inputs)


def test_fuse_conv_batchnorm_and_refold():
    model, inputs = make("convnet")
    program = functional(model, *inputs)
    result = passes.fuse_conv_batchnorm(program)
    assert result.modified
    fused = result.program
    fused.validate()
    assert aten._native_batch_norm_legit_no_training.default not in ops(fused)
    assert "conv1.weight" not in fused.state_dict and "bn1.running_var" not in fused.state_dict
    check_values(program, fused, inputs, atol=1e-5, rtol=1e-4)

    # Updating original weights by name recomputes the fused ones.
    recipes = passes.derived_weights(fused)
    assert {"conv1.weight", "bn1.running_var"} <= set(recipes["conv1_weight_fused_bn"].sources)
    new_var = torch.rand_like(model.bn1.running_var) + 0.2
    new_w = torch.randn_like(model.conv1.weight)
    refolded = passes.refold_weights(fused, {"bn1.running_var": new_var, "conv1.weight": new_w})
    assert set(refolded) == {"conv1_weight_fused_bn", "conv1_weight_fused_bn_bias"}
    fused.constants.update(refolded)
    with torch.no_grad():
        model.bn1.running_var.copy_(new_var)
        model.conv1.weight.copy_(new_w)
        assert_close(fused.module()(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


def test_fuse_conv_batchnorm_skips_training_mode():
    torch.manual_seed(0)
    from tests.models import TrainBN

    program = functional(TrainBN().train(), torch.randn(2, 3, 8, 8))
    assert passes.fuse_conv_batchnorm(program).modified is False


def test_fold_constants_and_refold():
    torch.manual_seed(0)
    model = WeightMath()
    program = functional(model, X)
    result = passes.fold_constants(program)
    assert result.modified
    folded = result.program
    folded.validate()
    left = ops(folded)
    assert aten.mul.Tensor not in left and aten.exp.default not in left
    assert aten.permute.default in left, "views of weights are not folded"
    assert set(folded.state_dict) == set(), "weights read only by folded code leave the program"
    check_values(program, folded, (X,))

    new_w = torch.randn(6, 6)
    refolded = passes.refold_weights(folded, {"w": new_w})
    assert len(refolded) == 1
    folded.constants.update(refolded)
    with torch.no_grad():
        model.w.copy_(new_w)
        assert_close(folded.module()(X), model(X))


def test_fold_constants_leaves_mutated_buffers_alone():
    program = functional(Counter(), torch.randn(2, 4))
    assert passes.fold_constants(program).modified is False


def test_refold_rejects_wrong_shape():
    model, inputs = make("convnet")
    fused = passes.fuse_conv_batchnorm(functional(model, *inputs)).program
    with pytest.raises(nativert.WeightsError, match=r"'bn1.running_var': got shape \(3,\)"):
        passes.refold_weights(fused, {"bn1.running_var": torch.ones(3)})


def test_decompose_keeps_preserved_ops_whole():
    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
    kept = functional(model, X, preserve=[aten.linear.default, aten.layer_norm.default])
    assert {aten.linear.default, aten.layer_norm.default} <= set(ops(kept))
    plain = functional(model, X)
    assert aten.linear.default not in ops(plain) and aten.addmm.default in ops(plain)
    check_values(plain, kept, (X,))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(4,), (3, 4)], ids=["vector", "batch"])
def test_multilabel_margin_loss_decomposes_to_what_eager_computes(reduction, shape):
    """torch 2.13's decomposition counts the slots after a target's first -1 as class 0
    (eager 0.325, decomposed 2.875 for [3, -1, 1, 2]) and gives a vector's unreduced loss
    shape [1]; ours matches eager."""

    x = torch.tensor([0.1, 0.2, 0.4, 0.8]).expand(*shape).contiguous()
    target = torch.tensor([3, -1, 1, 2]).expand(*shape).contiguous()
    if len(shape) == 2:
        target[1] = torch.tensor([0, 2, -1, 3])
        target[2] = torch.tensor([1, 0, 3, 2])
    module = torch.nn.MultiLabelMarginLoss(reduction=reduction)
    program = torch.export.export(module, (x, target))
    decomposed = decompose_to_core_aten(program).program
    ops = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert not any("multilabel" in op for op in ops), ops
    assert_close(decomposed.module()(x, target), module(x, target))

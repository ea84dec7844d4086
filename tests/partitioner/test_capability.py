"""CapabilityPartitioner on hand-made graphs: exact regions, reasons, constants, cycles."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn
from torch.export import Dim

import nativert
from nativert.delegate import support
from nativert.partitioner.base import REASON_KEY
from tests.conftest import assert_close
from tests.models import make
from tests.partitioner.delegates import TableDelegate, adds, muls

aten = torch.ops.aten


def lower(model, inputs, partitioner, **kwargs):
    return nativert.to_backend(torch.export.export(model, inputs, **kwargs), partitioner)


def region_ops(program) -> list[list[str]]:
    return [
        sorted(str(n.target) for n in m.original_module.graph.nodes if n.op == "call_function")
        for m in nativert.lowered_modules(program)
    ]


def kept(program) -> dict[str, str]:
    return {
        n.name: n.meta.get(REASON_KEY)
        for n in program.graph.nodes
        if n.op == "call_function"
        and n.target is not nativert.call_delegate
        and not (n.target is operator.getitem and n.args[0].target is nativert.call_delegate)
    }


class CrossDiamond(nn.Module):
    """adds region {a1, a2} and muls region {b1, b2}: a1 -> b1 and b2 -> a2, a cycle if both
    are fused."""

    def forward(self, x):
        a1 = x + 1
        b2 = x * 3
        b1 = a1 * 2
        a2 = b2 + 1
        return a2, b1


class AddChain(nn.Module):
    def forward(self, x):
        return torch.sin((x + 1) + 2) + 3


def test_regions_of_two_delegates_never_form_a_cycle(registered):
    registered(adds())
    registered(muls())
    x = torch.randn(3)
    program = lower(CrossDiamond(), (x,), nativert.CapabilityPartitioner(["adds", "muls"]))
    program.validate()
    # Equal sizes: the region of the lower-priority delegate (muls) goes back to PyTorch.
    assert region_ops(program) == [["aten.add.Tensor", "aten.add.Tensor"]]
    reasons = kept(program)
    assert set(reasons) == {"mul", "mul_1"}
    assert all(
        "its muls region would form a cycle with regions of adds" in r for r in reasons.values()
    )
    with torch.no_grad():
        assert_close(program.module()(x), CrossDiamond()(x))


class LopsidedCross(nn.Module):
    """adds region {a1, a2} (2 nodes) and muls region {b1, b2, b3} (3 nodes): a1 -> b1 and
    b3 -> a2 close a cycle if both are fused."""

    def forward(self, x):
        a1 = x + 1
        b2 = x * 3
        b3 = b2 * 4
        b1 = a1 * 2
        a2 = b3 + 1
        return a2, b1


def test_the_smaller_region_of_a_cycle_goes_back_whatever_its_priority(registered):
    registered(adds())
    registered(muls())
    x = torch.randn(3)
    # adds has the higher priority (first in the list), but its region is the smaller one.
    program = lower(LopsidedCross(), (x,), nativert.CapabilityPartitioner(["adds", "muls"]))
    program.validate()
    assert region_ops(program) == [["aten.mul.Tensor"] * 3]
    reasons = kept(program)
    assert set(reasons) == {"add", "add_1"}
    assert all(
        "its adds region would form a cycle with regions of muls" in r for r in reasons.values()
    )
    with torch.no_grad():
        assert_close(program.module()(x), LopsidedCross()(x))


class CrossThenSub(nn.Module):
    """CrossDiamond's cycle (adds {a1, a2}, muls {b1, b2}), then one sub that reads both:
    downstream of the cycle, not on it."""

    def forward(self, x):
        a1 = x + 1
        b2 = x * 3
        b1 = a1 * 2
        a2 = b2 + 1
        return a2 - b1


def subs() -> TableDelegate:
    return TableDelegate("subs", support.SupportTable.of([aten.sub.Tensor]))


def test_a_region_downstream_of_a_cycle_stays_delegated(registered):
    """Only regions on the cycle may go back: the subs region after it is not on it (a
    topological sort leaves it over too, which once sent it to PyTorch first, being the
    smallest)."""
    registered(adds())
    registered(muls())
    registered(subs())
    x = torch.randn(3)
    partitioner = nativert.CapabilityPartitioner(["adds", "muls", "subs"])
    program = lower(CrossThenSub(), (x,), partitioner)
    program.validate()
    assert sorted(region_ops(program)) == [["aten.add.Tensor"] * 2, ["aten.sub.Tensor"]]
    reasons = kept(program)
    assert set(reasons) == {"mul", "mul_1"}
    assert all(
        r == "its muls region would form a cycle with regions of adds; kept in PyTorch"
        for r in reasons.values()
    )
    with torch.no_grad():
        assert_close(program.module()(x), CrossThenSub()(x))


class Diamond(nn.Module):
    """a = x+1 -> sin -> c, and b = x+2 -> c: merging a with c would make a cycle via sin."""

    def forward(self, x):
        a = x + 1
        b = x + 2
        return torch.sin(a) + b


def region_nodes(program) -> list[set[str]]:
    return [
        {n.name for n in m.original_module.graph.nodes if n.op == "call_function"}
        for m in nativert.lowered_modules(program)
    ]


def test_diamond_within_one_delegate_is_split_without_cycle(registered):
    registered(adds())
    x = torch.randn(3)
    program = lower(Diamond(), (x,), nativert.CapabilityPartitioner(["adds"]))
    program.validate()
    regions = region_nodes(program)
    assert sorted(regions, key=len) == [{"add"}, {"add_1", "add_2"}]
    assert kept(program) == {"sin": "adds: aten.sin.default is not in the support table"}
    with torch.no_grad():
        assert_close(program.module()(x), Diamond()(x))


def test_exact_node_sets_split_by_unsupported_op(registered):
    registered(adds())
    x = torch.randn(3)
    program = lower(AddChain(), (x,), nativert.CapabilityPartitioner(["adds"]))
    assert region_ops(program) == [["aten.add.Tensor", "aten.add.Tensor"], ["aten.add.Tensor"]]
    assert kept(program) == {"sin": "adds: aten.sin.default is not in the support table"}
    with torch.no_grad():
        assert_close(program.module()(x), AddChain()(x))


def test_allow_single_node_ops_keeps_small_regions(registered):
    registered(adds())
    x = torch.randn(3)
    strict = nativert.CapabilityPartitioner(["adds"], min_block_size=2)
    assert region_ops(lower(AddChain(), (x,), strict)) == [["aten.add.Tensor"] * 2]
    allowed = nativert.CapabilityPartitioner(
        ["adds"], min_block_size=2, allow_single_node_ops=["aten::add"]
    )
    assert len(region_ops(lower(AddChain(), (x,), allowed))) == 2


def test_a_view_between_nodes_kept_in_pytorch_says_so():
    class SinViewSin(nn.Module):
        def forward(self, x):
            return torch.sin(torch.sin(x).view(-1))

    x = torch.randn(2, 4)
    partitioner = nativert.CapabilityPartitioner(["onnxruntime"], exclude_ops=["aten::sin"])
    program = lower(SinViewSin(), (x,), partitioner)
    assert nativert.delegate_nodes(program) == []
    reasons = set(kept(program).values())
    assert reasons == {"excluded by user", next(r for r in reasons if r.startswith("only views"))}
    assert_close(program.module()(x), SinViewSin()(x))


def test_views_and_getitems_do_not_count_toward_min_block_size():
    model = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    # decomposed linear = permute (a view) + addmm: one compute node
    program = lower(model, (x,), nativert.CapabilityPartitioner(min_block_size=2))
    assert nativert.delegate_nodes(program) == []
    assert set(kept(program).values()) == {"region below min_block_size=2"}
    program = lower(model, (x,), nativert.CapabilityPartitioner(min_block_size=1))
    assert len(nativert.delegate_nodes(program)) == 1


def test_priority_order_decides_between_delegates(registered):
    registered(adds("adds_a"))
    registered(adds("adds_b"))
    x = torch.randn(3)
    for order in (["adds_a", "adds_b"], ["adds_b", "adds_a"]):
        program = lower(AddChain(), (x,), nativert.CapabilityPartitioner(order))
        assert {m.backend_id for m in nativert.lowered_modules(program)} == {order[0]}


def test_all_node_partitioner_makes_one_region():
    model, inputs = make("convnet")
    program = lower(model, inputs, nativert.AllNodePartitioner("eager"))
    assert len(nativert.delegate_nodes(program)) == 1
    assert kept(program) == {}


def test_shared_weight_is_passed_to_both_regions_not_copied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.sin(x @ self.w) @ self.w

    model, x = Tied(), torch.randn(2, 4)
    program = lower(model, (x,), nativert.CapabilityPartitioner(exclude_ops=["aten::sin"]))
    segments = nativert.lowered_modules(program)
    assert len(segments) == 2
    for segment in segments:
        assert "w" not in segment.original_module.state_dict, "shared weight must not be owned"
    assert list(program.state_dict) == ["w"]
    with torch.no_grad():
        assert_close(program.module()(x), model(x))


# -- support tables and checkers ------------------------------------------------------------


def table_delegate(name, checker):
    ops = [
        aten.add.Tensor,
        aten.mul.Tensor,
        aten.mm.default,
        aten.addmm.default,
        aten.permute.default,
        aten.sum.dim_IntList,
    ]
    return TableDelegate(name, support.SupportTable.of(ops, every_op=checker))


def test_dtype_checker_reason(registered):
    registered(table_delegate("f32_only", support.dtypes(torch.float32)))
    x = torch.randn(3, dtype=torch.float64)
    program = lower(AddChain(), (x,), nativert.CapabilityPartitioner(["f32_only"]))
    assert set(kept(program).values()) >= {"f32_only: dtype float64 not supported"}


def test_rank_checker_reason(registered):
    registered(table_delegate("rank1", support.max_rank(1)))
    program = lower(AddChain(), (torch.randn(2, 3),), nativert.CapabilityPartitioner(["rank1"]))
    assert "rank1: rank 2 exceeds the supported maximum 1" in kept(program).values()


def test_static_shape_checker_reason(registered):
    registered(table_delegate("static", support.static_shapes()))
    x = torch.randn(4, 3)
    program = lower(
        AddChain(),
        (x,),
        nativert.CapabilityPartitioner(["static"]),
        dynamic_shapes=({0: Dim("b", min=2, max=8)},),
    )
    assert "static: dynamic dimensions not supported" in kept(program).values()


def test_constant_args_checker(registered):
    checker = support.constant_args(2)  # addmm(bias, x, weight_t): weight must be constant
    table = support.SupportTable({aten.addmm.default: checker, aten.permute.default: None})
    registered(TableDelegate("const_w", table))

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.lin(x) + torch.addmm(self.lin.bias, x, y)

    x, y = torch.randn(2, 4), torch.randn(4, 4)
    program = lower(Both(), (x, y), nativert.CapabilityPartitioner(["const_w"]))
    reasons = kept(program)
    assert reasons["addmm_1"] == "const_w: argument 2 (y) must be a constant weight"
    assert region_ops(program) == [["aten.addmm.default", "aten.permute.default"]]


def test_checker_errors_propagate(registered):
    def broken(node):
        raise RuntimeError("checker bug")

    registered(table_delegate("broken", broken))
    with pytest.raises(RuntimeError, match="checker bug"):
        lower(AddChain(), (torch.randn(3),), nativert.CapabilityPartitioner(["broken"]))


def test_support_table_rejects_non_ops():
    with pytest.raises(TypeError, match="keys must be OpOverloads"):
        support.SupportTable({"aten::add": None})


def test_partitioner_options_are_validated():
    # The partitioner's options are Settings fields, checked by Settings (tests/test_settings).
    with pytest.raises(nativert.SettingsError, match="min_block_size must be an int >= 1, got 0"):
        nativert.CapabilityPartitioner(min_block_size=0)
    with pytest.raises(nativert.SettingsError, match="write \\['eager'\\]"):
        nativert.CapabilityPartitioner("eager")
    with pytest.raises(
        nativert.SettingsError, match="exclude_ops: .*'namespace::name' strings, got 'relu'"
    ):
        nativert.CapabilityPartitioner(exclude_ops=["relu"])

"""delegation_report: counts add up, every kept node has a reason, readable and machine forms."""

from __future__ import annotations

import operator

import pytest
import torch

import nativert
from nativert.partitioner.base import TAG_KEY
from nativert.passes import DEFAULT_PIPELINE, decompose_to_core_aten, run_passes
from tests.models import make
from tests.partitioner.delegates import adds


def compute_nodes_before_lowering(model, inputs, backend_id) -> int:
    preserve = nativert.get_delegate(backend_id).ops_to_preserve()
    program = decompose_to_core_aten(torch.export.export(model, inputs), preserve=preserve)
    program = run_passes(program.program, DEFAULT_PIPELINE).program
    return sum(
        1
        for n in program.graph.nodes
        if n.op == "call_function" and n.target is not operator.getitem
    )


@pytest.mark.parametrize("backend_id", ["eager", "onnxruntime"])
@pytest.mark.parametrize("name", ["mlp", "convnet", "split_by_sin", "multi_output"])
def test_counts_add_up_and_every_kept_node_has_a_reason(name, backend_id):
    model, inputs = make(name)
    partitioner = nativert.CapabilityPartitioner(
        [backend_id], exclude_ops=["aten::sin", "aten::tanh"]
    )
    program = nativert.to_backend(torch.export.export(model, inputs), partitioner)
    report = nativert.delegation_report(program)
    assert report.total_nodes == compute_nodes_before_lowering(model, inputs, backend_id)
    assert report.delegated_nodes == sum(r.num_nodes for r in report.regions)
    pytorch_ops = {op for op, by in report.ops.items() if by.get("pytorch")}
    assert pytorch_ops == set(report.reasons)
    for op, reasons in report.reasons.items():
        assert sum(reasons.values()) == report.ops[op]["pytorch"]
        assert all(reason and "no reason recorded" not in reason for reason in reasons)


def test_report_text_and_dict(registered):
    registered(adds())
    model, inputs = make("split_by_sin")
    program = nativert.to_backend(
        torch.export.export(model, inputs), nativert.CapabilityPartitioner(["adds"])
    )
    report = nativert.delegation_report(program)
    text = str(report)
    assert text.startswith("Delegation report: 1 of ")
    assert "aten.sin.default" in text and "not in the support table" in text
    data = report.to_dict()
    assert data["per_delegate"]["adds"] == 1
    assert data["regions"] == [
        {
            "name": "adds_0",
            "backend_id": "adds",
            "num_nodes": 1,
            "tuning": "",
            "precision": "fp32",
            "accuracy": None,
        }
    ]
    assert data["total_nodes"] == sum(data["per_delegate"].values())


def test_report_on_program_without_partition_metadata():
    model, inputs = make("split_by_sin")
    program = nativert.to_backend(
        torch.export.export(model, inputs),
        nativert.CapabilityPartitioner(exclude_ops=["aten::sin"]),
    )
    for node in program.graph.nodes:  # what a program loaded from disk looks like
        node.meta.pop("nativert_not_delegated", None)
        node.meta.pop(TAG_KEY, None)
    report = nativert.delegation_report(program)
    assert report.reasons["aten.sin.default"] == {
        "no reason recorded (not partitioned by nativert, or loaded without metadata)": 1
    }
    assert report.ops["aten.sin.default"] == {"pytorch": 1}
    assert "getitem" not in report.ops, "getitems of delegate calls are plumbing, not nodes"


def test_counts_are_the_same_for_a_loaded_package(tmp_path):
    """One counting rule: lowering and a loaded package (what `nativert inspect` shows)
    report the same numbers for a net with multi-output batch norms."""
    from nativert.models import ConvBnRelu

    torch.manual_seed(0)
    model = ConvBnRelu().eval()
    x = torch.randn(1, 3, 16, 16)
    lowered = nativert.to_backend(torch.export.export(model, (x,)), cache_dir=None)
    path = tmp_path / "net.pt2"
    nativert.save(lowered, path)
    before = nativert.delegation_report(lowered)
    after = nativert.delegation_report(nativert.load(path))
    assert before.total_nodes > 0
    assert (after.delegated_nodes, after.total_nodes) == (
        before.delegated_nodes,
        before.total_nodes,
    )
    assert "getitem" not in str(before.ops)


def test_headline_and_each_reason_once():
    model, inputs = make("mlp")
    program = torch.export.export(model, inputs)
    partitioner = nativert.CapabilityPartitioner(
        ["onnxruntime"], exclude_ops=["aten::linear", "aten::relu"]
    )
    report = nativert.delegation_report(nativert.to_backend(program, partitioner))
    assert report.delegated_nodes < 0.9 * report.total_nodes
    kept = report.total_nodes - report.delegated_nodes
    assert report.headline.startswith(f"only {100 * report.delegated_nodes // report.total_nodes}")
    assert f"of the {kept} nodes in PyTorch: excluded by user" in report.headline
    text = str(report)
    assert text.splitlines()[1] == f"  ! {report.headline}"
    assert text.count("excluded by user") == 2  # the headline and the reasons, once
    assert report.to_dict()["headline"] == report.headline
    full = nativert.delegation_report(nativert.to_backend(program))
    assert full.headline is None and "!" not in str(full)


def test_metadata_checks_are_not_left_in_pytorch():
    """export's `_assert_tensor_metadata` (from `.to(dtype)`) checks nothing a program's
    signature does not fix; it no longer stays behind as a PyTorch node."""

    class Casts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x.to(torch.float32)).to(torch.float64).sum(-1)

    model, x = Casts(), torch.randn(2, 8, dtype=torch.float64)
    exported = torch.export.export(model, (x,))
    assert any("_assert_tensor_metadata" in str(n.target) for n in exported.graph.nodes)
    lowered = nativert.to_backend(exported, cache_dir=None)
    report = nativert.delegation_report(lowered)
    assert "aten._assert_tensor_metadata.default" not in report.ops
    assert report.delegated_nodes == report.total_nodes
    torch.testing.assert_close(nativert.Executor(lowered)(x), model(x))

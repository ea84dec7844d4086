"""delegation_report: counts add up, every kept node has a reason, readable and machine forms."""

from __future__ import annotations

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
    return sum(1 for n in program.graph.nodes if n.op == "call_function")


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
        {"name": "adds_0", "backend_id": "adds", "num_nodes": 1, "tuning": ""}
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

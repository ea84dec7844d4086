"""The ONNX payload read without onnx (onnxruntime/proto.py) reads and writes what onnx's own
classes do, and the untrusted-payload check finds external data wherever ONNX can put it."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import nativert
from nativert._program.mapped import FileRegion
from nativert.backend.delegates.onnxruntime.export import (
    check_untrusted,
    external_initializers,
    reading_files,
)
from nativert.backend.delegates.onnxruntime.proto import parse


@pytest.fixture(scope="module")
def payload() -> bytes:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    program = nativert.to_backend(torch.export.export(model, (torch.randn(2, 8),)), cache_dir=None)
    (lowered,) = nativert.lowered_modules(program)
    return lowered.processed_bytes


def test_external_initializers_and_file_regions_as_onnx_reads_them(payload):
    model = onnx.load_from_string(payload)
    marked = [i.name for i in model.graph.initializer if i.data_location == TensorProto.EXTERNAL]
    assert external_initializers(payload) == tuple(marked) and len(marked) == 4
    regions = {
        name: FileRegion(f"/data/w{k}.pt2", 64 * k, 16 * (k + 1), ())
        for k, name in enumerate(marked[:2])
    }
    rewritten = onnx.load_from_string(reading_files(payload, regions))
    # What onnx's classes give for the same edit: equal, every other field kept.
    for init in model.graph.initializer:
        if init.name in regions:
            region = regions[init.name]
            del init.external_data[:]
            for key, value in (
                ("location", region.path.rsplit("/", 1)[1]),
                ("offset", str(region.offset)),
                ("length", str(region.nbytes)),
            ):
                init.external_data.add(key=key, value=value)
    assert rewritten == model
    check_untrusted(payload)


def _with_external(tensor: TensorProto) -> TensorProto:
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    return tensor


def _model(graph_edit=None, **model_kw) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    if graph_edit is not None:
        graph_edit(graph)
    return helper.make_model(graph, **model_kw).SerializeToString()


def _sparse_initializer(graph):
    values = _with_external(helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    indices = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2]))


def _sparse_indices(graph):
    values = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    indices = _with_external(helper.make_tensor("i", TensorProto.INT64, [1], [0]))
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2]))


def _subgraph_attribute(graph):
    inner = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["c"],
                value=_with_external(helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])),
            )
        ],
        "inner",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
    )
    graph.node.append(helper.make_node("If", ["x"], ["z"], then_branch=inner, else_branch=inner))


@pytest.mark.parametrize(
    "edit",
    [
        lambda g: g.initializer.append(
            _with_external(helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0]))
        ),
        _sparse_initializer,
        _sparse_indices,
        _subgraph_attribute,
    ],
    ids=["initializer", "sparse-values", "sparse-indices", "subgraph-constant"],
)
def test_external_data_anywhere_is_refused(edit):
    check_untrusted(_model())  # the plain model passes
    with pytest.raises(ValueError, match="reads external data from"):
        check_untrusted(_model(edit))


def test_functions_training_info_and_foreign_domains_are_refused():
    function = helper.make_function("custom", "f", ["a"], ["b"], [], [])
    for payload in (
        _model(functions=[function]),
        _model(opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil", 1)]),
    ):
        with pytest.raises(ValueError, match="nativert never writes"):
            check_untrusted(payload)
    model = onnx.load_from_string(_model())
    model.training_info.add().algorithm.name = "train"
    with pytest.raises(ValueError, match="training info"):
        check_untrusted(model.SerializeToString())
    with pytest.raises(ValueError, match="not an ONNX model"):
        check_untrusted(b"\xff" * 64)
    assert parse(_model()).graph.node  # the subset reads a plain model

"""The parts of ONNX's ModelProto that running a payload needs, read without importing onnx.

`import onnx` costs 0.7 s (its ml_dtypes extension), most of the time it takes to load a
package, only to read which initializers are external, point them at a file, and check that a
payload reads no other file. These messages declare just the fields those steps use, with
onnx.proto's field numbers and wire types, in a descriptor pool of their own (no clash with
onnx's classes when onnx is imported too). Every other field is kept as an unknown field and
written back unchanged when a payload is re-serialized. tests/backend/delegates compares what
they read and write with onnx's own classes.
"""

from __future__ import annotations

import functools
from typing import Any

_PACKAGE = "nativert_onnx_subset"
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# message: [(field, number, type, label, message type)]; types and labels as in
# descriptor_pb2.FieldDescriptorProto. onnx.proto is proto2.
_STRING, _INT32, _INT64, _BYTES, _MESSAGE = 9, 5, 3, 12, 11
_OPTIONAL, _REPEATED = 1, 3
_MESSAGES: dict[str, list[tuple[str, int, int, int, str | None]]] = {
    "StringStringEntryProto": [
        ("key", 1, _STRING, _OPTIONAL, None),
        ("value", 2, _STRING, _OPTIONAL, None),
    ],
    "OperatorSetIdProto": [
        ("domain", 1, _STRING, _OPTIONAL, None),
        ("version", 2, _INT64, _OPTIONAL, None),
    ],
    "TensorProto": [
        ("name", 8, _STRING, _OPTIONAL, None),
        ("external_data", 13, _MESSAGE, _REPEATED, "StringStringEntryProto"),
        ("data_location", 14, _INT32, _OPTIONAL, None),
    ],
    "SparseTensorProto": [
        ("values", 1, _MESSAGE, _OPTIONAL, "TensorProto"),
        ("indices", 2, _MESSAGE, _OPTIONAL, "TensorProto"),
    ],
    "AttributeProto": [
        ("t", 5, _MESSAGE, _OPTIONAL, "TensorProto"),
        ("g", 6, _MESSAGE, _OPTIONAL, "GraphProto"),
        ("tensors", 10, _MESSAGE, _REPEATED, "TensorProto"),
        ("graphs", 11, _MESSAGE, _REPEATED, "GraphProto"),
        ("sparse_tensor", 22, _MESSAGE, _OPTIONAL, "SparseTensorProto"),
        ("sparse_tensors", 23, _MESSAGE, _REPEATED, "SparseTensorProto"),
    ],
    "NodeProto": [("attribute", 5, _MESSAGE, _REPEATED, "AttributeProto")],
    "GraphProto": [
        ("node", 1, _MESSAGE, _REPEATED, "NodeProto"),
        ("initializer", 5, _MESSAGE, _REPEATED, "TensorProto"),
        ("sparse_initializer", 15, _MESSAGE, _REPEATED, "SparseTensorProto"),
    ],
    "ModelProto": [
        ("graph", 7, _MESSAGE, _OPTIONAL, "GraphProto"),
        ("opset_import", 8, _MESSAGE, _REPEATED, "OperatorSetIdProto"),
        # Only counted (nativert writes neither): raw bytes are enough for that.
        ("training_info", 20, _BYTES, _REPEATED, None),
        ("functions", 25, _BYTES, _REPEATED, None),
    ],
}


@functools.cache
def _model_class() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(
        name="nativert/onnx_subset.proto", package=_PACKAGE, syntax="proto2"
    )
    for message, fields in _MESSAGES.items():
        proto = file.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            field = proto.field.add(name=name, number=number, type=kind, label=label)
            if type_name is not None:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelProto"))


def parse(payload: bytes) -> Any:
    """The payload as a ModelProto of this module's fields; raises the protobuf library's
    DecodeError for bytes that are not one."""
    model = _model_class()()
    model.ParseFromString(payload)
    return model


def tensors(graph: Any) -> Any:
    """Every tensor an ONNX graph holds: initializers (sparse ones' values and indices) and
    attribute tensors, in subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sparse in (
                [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            ) + list(attribute.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            if attribute.HasField("g"):
                yield from tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from tensors(subgraph)

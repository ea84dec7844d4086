"""The openvino delegate's payload: its format, and the check that makes it data.

Format (all integers little-endian):

    MAGIC                       b"nativert.openvino.ir\\n" (21 bytes)
    header, xml, bin lengths    three uint64
    header                      UTF-8 JSON: {"format": 1, "parameters": [[name, role, ref]...],
                                "outputs": n}; role "weight" (ref: the weight's target) or
                                "input" (ref: the segment's user-input index)
    xml                         the IR's XML (OpenVINO IR v11)
    bin                         the IR's binary blob: non-weight constants only

`check_untrusted` refuses anything but an IR of built-in operations (see the package
docstring).
"""

from __future__ import annotations

import json
import re
import struct
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAGIC = b"nativert.openvino.ir\n"
FORMAT = 1
_LENGTHS = struct.Struct("<QQQ")
# The opsets of OpenVINO's built-in operations; the IR reader creates an op only from these
# (or from extensions, which nativert never adds to its Core).
_OPSET = re.compile(r"opset([1-9][0-9]?)")
# Model-level rt_info the IR serializer writes; anything else is refused (rt_info can carry
# runtime options that compile_model applies).
_MODEL_RT_INFO = frozenset({"Runtime_version"})
# Bytes per element of the constant types an IR from nativert can hold.
_WIDTHS = {
    **dict.fromkeys(("f64", "i64", "u64"), 8),
    **dict.fromkeys(("f32", "i32", "u32"), 4),
    **dict.fromkeys(("f16", "bf16", "i16", "u16"), 2),
    **dict.fromkeys(("i8", "u8", "boolean"), 1),
}


@dataclass(frozen=True)
class Payload:
    """An unpacked payload: which IR Parameter is which, and the IR itself."""

    parameters: tuple[tuple[str, str, str | int], ...]  # (name, "weight"|"input", ref)
    outputs: int
    xml: bytes
    bin: bytes


def pack(payload: Payload) -> bytes:
    header = json.dumps(
        {
            "format": FORMAT,
            "parameters": [list(p) for p in payload.parameters],
            "outputs": payload.outputs,
        }
    ).encode()
    return b"".join(
        (
            MAGIC,
            _LENGTHS.pack(len(header), len(payload.xml), len(payload.bin)),
            header,
            payload.xml,
            payload.bin,
        )
    )


def unpack(data: bytes) -> Payload:
    """The payload's parts; ValueError naming what is malformed."""
    if not data.startswith(MAGIC):
        raise ValueError("not an openvino delegate payload (bad magic bytes)")
    start = len(MAGIC) + _LENGTHS.size
    if len(data) < start:
        raise ValueError("truncated openvino payload")
    sizes = _LENGTHS.unpack_from(data, len(MAGIC))
    if start + sum(sizes) != len(data):
        raise ValueError(
            f"openvino payload lengths {list(sizes)} do not add up to its size {len(data)}"
        )
    header_end = start + sizes[0]
    xml_end = header_end + sizes[1]
    try:
        header = json.loads(data[start:header_end].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"openvino payload header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"openvino payload header must be an object with format {FORMAT}")
    parameters, outputs = header.get("parameters"), header.get("outputs")
    if not isinstance(outputs, int) or isinstance(outputs, bool) or outputs < 0:
        raise ValueError("openvino payload header: 'outputs' must be a count")
    if not isinstance(parameters, list) or not all(_is_parameter(p) for p in parameters):
        raise ValueError(
            "openvino payload header: 'parameters' must list [name, 'weight', target] or "
            "[name, 'input', index]"
        )
    return Payload(
        tuple(tuple(p) for p in parameters), outputs, data[header_end:xml_end], data[xml_end:]
    )


def _is_parameter(entry: Any) -> bool:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
        return False
    role, ref = entry[1], entry[2]
    if role == "weight":
        return isinstance(ref, str)
    return role == "input" and isinstance(ref, int) and not isinstance(ref, bool) and ref >= 0


def check_untrusted(data: bytes) -> None:
    """Raise ValueError unless the payload is an IR of built-in operations only: every layer
    from a standard opset (no extension or custom op types, which would need code loaded),
    constants inside the payload's own blob, no DTD or entities, no rt_info beyond the
    runtime version (rt_info can carry runtime options)."""
    payload = unpack(data)
    head = payload.xml[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in payload.xml.lower():
        raise ValueError("its IR declares a DTD or entities; OpenVINO IR never does")
    try:
        root = ElementTree.fromstring(payload.xml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"its IR is not well-formed XML: {exc}") from None
    if root.tag != "net" or root.get("version") not in ("10", "11"):
        raise ValueError("its IR is not an OpenVINO IR v10/v11 <net>")
    names = {p[0] for p in payload.parameters}
    parameter_names = set()
    for layer, depth in _layers(root):
        kind, version = layer.get("type"), layer.get("version")
        if version is None or not _OPSET.fullmatch(version):
            raise ValueError(
                f"layer {layer.get('name')!r} of type {kind!r} is from {version!r}, not a "
                "standard opset: extension and custom operations need native code"
            )
        if kind == "Const":
            _check_constant(layer, len(payload.bin))
        if kind == "Parameter" and depth == 0:
            parameter_names.add(layer.get("name"))
    if parameter_names != names:
        raise ValueError(
            f"its IR inputs {sorted(parameter_names)} are not the ones its header lists "
            f"{sorted(names)}"
        )
    for info in root.iter("rt_info"):
        keys = [child.tag for child in info]
        if info not in list(root) or set(keys) - _MODEL_RT_INFO:
            raise ValueError(
                f"its IR carries rt_info {keys}; nativert payloads carry only "
                f"{sorted(_MODEL_RT_INFO)}"
            )


def _layers(root: ElementTree.Element) -> Iterator[tuple[ElementTree.Element, int]]:
    """Every layer, in bodies (If, Loop, TensorIterator) too, with its nesting depth."""

    def walk(net: ElementTree.Element, depth: int) -> Iterator[tuple[ElementTree.Element, int]]:
        for layers in net.findall("layers"):
            for layer in layers.findall("layer"):
                yield layer, depth
                for body in layer:
                    if body.tag in ("body", "then_body", "else_body"):
                        yield from walk(body, depth + 1)

    if any(child.tag not in ("layers", "edges", "rt_info") for child in root):
        raise ValueError("its IR has sections other than layers, edges and rt_info")
    yield from walk(root, 0)


def _check_constant(layer: ElementTree.Element, blob_size: int) -> None:
    data = layer.find("data")
    if data is None:
        raise ValueError(f"constant {layer.get('name')!r} has no data")
    try:
        offset, size = int(data.get("offset", "")), int(data.get("size", ""))
    except ValueError:
        raise ValueError(f"constant {layer.get('name')!r} has no valid offset and size") from None
    if offset < 0 or size < 0 or offset + size > blob_size:
        raise ValueError(
            f"constant {layer.get('name')!r} reads bytes {offset}..{offset + size} of a "
            f"{blob_size}-byte blob"
        )
    width = _WIDTHS.get(data.get("element_type", ""))
    dims = data.get("shape", "").replace(" ", "")
    if width is None or not re.fullmatch(r"(\d+(,\d+)*)?", dims):
        raise ValueError(
            f"constant {layer.get('name')!r} has element type {data.get('element_type')!r} and "
            f"shape {dims!r}; nativert writes numeric constants with static shapes only"
        )
    count = 1
    for dim in filter(None, dims.split(",")):
        count *= int(dim)
    if count * width != size:
        raise ValueError(f"constant {layer.get('name')!r}: {size} bytes for shape [{dims}]")

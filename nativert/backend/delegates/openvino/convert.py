"""The openvino delegate's compile step: a segment through OpenVINO's PyTorch frontend to a
weight-free IR (payload.py has the format).

The segment's graph module goes through OpenVINO's PyTorch frontend (the FX decoder that
`openvino.convert_model` uses for an ExportedProgram) straight, without `convert_model`
around it: that wrapper re-runs decompositions on a program we decomposed already, makes
every dimension dynamic, takes a quarter of a second more, and sends usage telemetry
(OpenVINO's `openvino_telemetry`, on unless the user opted out) from every compile. Then the
same IR clean-up `convert_model` applies (`apply_moc_transformations` without constant
folding, `apply_fused_names_cleanup`).

Every placeholder becomes an IR Parameter: the weights too, so the IR carries no weight
values, and the executor replaces those Parameters with Constants over the torch tensors
before it compiles (OpenVINO then folds and pre-packs them as if they were embedded).
Dimensions the segment has as SymInts (torch.export Dims) are dynamic, the rest static.
Converted outputs must have the segment's dtypes, and the IR must pass the untrusted-payload
check (it will be checked when a package is loaded).
"""

from __future__ import annotations

import math
import operator
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from nativert._program import copy_graph_module, placeholder_values, weight_names
from nativert._program.quant import DEQUANTIZE_OPS, QUANTIZE_OPS
from nativert.backend.delegates.openvino.payload import Payload, check_untrusted, pack
from nativert.delegate import INT8, PRECISION_SPEC, SPEC_PRECISIONS, CompileSpec
from nativert.errors import DelegateCompileError

aten = torch.ops.aten
THREADS = "inference_num_threads"
SPEC_KEYS = frozenset({THREADS, PRECISION_SPEC})
# nativert precision -> the CPU plugin's OPTIMIZATION_CAPABILITIES entry that makes it real.
CAPABILITIES = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}
# The dtypes the executor binds (the support table keeps every other one out of segments).
DTYPES = (torch.float32, torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8)
_OV_DTYPES = {
    "f32": torch.float32,
    "i64": torch.int64,
    "i32": torch.int32,
    "boolean": torch.bool,
    "u8": torch.uint8,
    "i8": torch.int8,
}


def to_torch_dtype(element_type: Any) -> torch.dtype | None:
    """The torch dtype of an OpenVINO element type (None for those nativert never binds)."""
    return _OV_DTYPES.get(element_type.get_type_name())


def check_values(values: Mapping[str, Any]) -> None:
    """Raise ValueError naming a compile spec whose value is not one it takes."""
    threads = values.get(THREADS)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024
    ):
        raise ValueError(f"compile spec {THREADS!r} must be an int from 1 to 1024, got {threads!r}")
    precision = values.get(PRECISION_SPEC, "fp32")
    if precision not in SPEC_PRECISIONS:
        raise ValueError(
            f"compile spec {PRECISION_SPEC!r} must be one of {list(SPEC_PRECISIONS)}, got "
            f"{precision!r}"
        )


def int64_out_of_range(tensor: torch.Tensor) -> bool:
    """An int64 tensor with a value OpenVINO's int32 arithmetic would not keep exactly
    (outside +-support.INT64_LIMIT: see the support table)."""
    from nativert.backend.delegates.openvino.support import INT64_LIMIT

    if tensor.dtype != torch.int64 or not tensor.numel():
        return False
    low, high = torch.aminmax(tensor.detach())
    return bool(low <= -INT64_LIMIT) or bool(high >= INT64_LIMIT)


def check_int64_weights(weights: Mapping[str, Any]) -> None:
    """Raise ValueError naming an int64 weight outside the range OpenVINO computes exactly."""
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and int64_out_of_range(tensor):
            raise ValueError(
                f"int64 weight {name!r} holds values beyond +-2**30, which OpenVINO's CPU "
                "plugin would compute as int32; keep this region in PyTorch"
            )


def options(compile_specs: Sequence[CompileSpec]) -> dict[str, Any]:
    """The compile specs as a dict; unknown ones raise."""
    values = {spec.key: spec.value for spec in compile_specs}
    unknown = sorted(set(values) - SPEC_KEYS)
    if unknown:
        raise DelegateCompileError(
            f"openvino: unknown compile specs {unknown}; valid: {sorted(SPEC_KEYS)}"
        )
    try:
        check_values(values)
    except ValueError as exc:
        raise DelegateCompileError(f"openvino: {exc}") from None
    return values


def _frontend_spelling(program: ExportedProgram, int8: bool = False) -> torch.fx.GraphModule:
    """The segment's graph module, spelled the way OpenVINO's FX frontend converts it:
    - `reshape` as `view`: lowering turns a segment's views into reshapes
      (lowering._views_to_reshapes), and the frontend converts only `view` (to a Reshape,
      which has no strides to check);
    - `layer_norm` and `group_norm` (kept whole by decomposition for the runtimes that fuse
      them) as output 0 of `native_layer_norm` / `native_group_norm`, which it converts to
      the same MVN-based subgraph (group_norm with static shapes: the support table checks);
    - PT2E's quantize / dequantize (see _spell_quantized)."""
    targets = {aten.reshape.default, aten.layer_norm.default, aten.group_norm.default}
    targets |= QUANTIZE_OPS | DEQUANTIZE_OPS
    if not any(n.target in targets for n in program.graph.nodes):
        return program.graph_module
    gm = copy_graph_module(program)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target in QUANTIZE_OPS or node.target in DEQUANTIZE_OPS:
            _spell_quantized(graph, node, int8)
        elif node.target is aten.reshape.default:
            node.target = aten.view.default
        elif node.target in (aten.layer_norm.default, aten.group_norm.default):
            with graph.inserting_before(node):
                native = graph.call_function(*_native_norm(node))
                first = graph.call_function(operator.getitem, (native, 0))
            first.meta = dict(node.meta)
            node.replace_all_uses_with(first)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _spell_quantized(graph: torch.fx.Graph, node: torch.fx.Node, int8: bool) -> None:
    """Rewrite one quantize / dequantize so that OpenVINO computes what PyTorch does.

    The frontend turns a quantize into a FakeQuantize (quantize and dequantize in one, in
    float) and passes a dequantize through, which is right for activations (quantize ->
    dequantize pairs) but leaves an int8 weight undequantized. So with `int8` a dequantize
    of anything but a quantize becomes its arithmetic, `(float(q) - zero_point) * scale`,
    the form OpenVINO's low-precision transformations take as int8 weights. Without `int8`
    (the accuracy guard's fp32 fallback) both become arithmetic on float32 values, which
    OpenVINO computes as PyTorch does, up to summation order (a value on a rounding boundary
    may land one quantization step away)."""
    source = node.args[0]
    pair = (  # a quantize read only by dequantizes in the segment, or such a dequantize
        node.target in QUANTIZE_OPS
        and all(u.target in DEQUANTIZE_OPS for u in node.users)
        or isinstance(source, torch.fx.Node)
        and source.target in QUANTIZE_OPS
        and all(u.target in DEQUANTIZE_OPS for u in source.users)
    )
    if int8 and pair:
        return  # the frontend's FakeQuantize
    channel = node.target is torch.ops.quantized_decomposed.dequantize_per_channel.default
    scale, zero_point = node.args[1:3]
    val = node.meta["val"]
    rank = source.meta["val"].dim() if isinstance(source, torch.fx.Node) else 0
    fake = source.meta["val"]

    def call(target: Any, args: tuple, kwargs: dict | None = None, like: Any = None) -> Any:
        new = graph.call_function(target, args, kwargs or {})
        new.meta["val"] = like if like is not None else torch.empty_like(fake, dtype=torch.float32)
        return new

    with graph.inserting_before(node):
        if channel:  # scales / zero points along `axis`
            axis = node.args[3] % rank
            shape = [-1 if d == axis else 1 for d in range(rank)]
            scale = call(aten.view.default, (scale, shape), like=scale.meta["val"].view(shape))
            zp = call(
                aten._to_copy.default,
                (zero_point,),
                {"dtype": torch.float32},
                like=torch.empty_like(zero_point.meta["val"], dtype=torch.float32),
            )
            zero_point = call(aten.view.default, (zp, shape), like=zp.meta["val"].view(shape))
        if node.target in DEQUANTIZE_OPS:
            as_float = call(aten._to_copy.default, (source,), {"dtype": torch.float32})
            centred = call(aten.sub.Tensor, (as_float, zero_point))
            result = call(aten.mul.Tensor, (centred, scale), like=val)
        else:  # clamp(round(x / scale) + zero_point, quant_min, quant_max), as PyTorch does
            quant_min, quant_max, dtype = node.args[3:6]
            scaled = call(aten.mul.Tensor, (source, 1.0 / scale))
            rounded = call(aten.round.default, (scaled,))
            shifted = call(aten.add.Tensor, (rounded, zero_point))
            clamped = call(aten.clamp.default, (shifted, quant_min, quant_max))
            result = call(aten._to_copy.default, (clamped,), {"dtype": dtype}, like=val)
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _native_norm(node: torch.fx.Node) -> tuple[Any, tuple[Any, ...]]:
    """The native_* call (target, args) that computes `node`'s layer_norm / group_norm."""
    if node.target is aten.layer_norm.default:
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        defaults = {"weight": None, "bias": None, "eps": 1e-5}
        args = _bound(node, names, defaults)
        return aten.native_layer_norm.default, tuple(args[n] for n in names)
    names = ("input", "num_groups", "weight", "bias", "eps")
    args = _bound(node, names, {"weight": None, "bias": None, "eps": 1e-5})
    shape = [int(d) for d in args["input"].meta["val"].shape]
    n, c, hw = shape[0], shape[1], math.prod(shape[2:])
    return aten.native_group_norm.default, (
        args["input"],
        args["weight"],
        args["bias"],
        n,
        c,
        hw,
        args["num_groups"],
        args["eps"],
    )


def _bound(node: torch.fx.Node, names: Sequence[str], defaults: Mapping[str, Any]) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, node.args, strict=False))
    bound.update({k: v for k, v in node.kwargs.items() if k in names})
    return bound


def _frontend_convert(program: ExportedProgram, int8: bool) -> Any:
    """The segment as an ov.Model whose Parameters are the segment's placeholders."""
    from openvino._offline_transformations import (
        apply_fused_names_cleanup,
        apply_moc_transformations,
    )
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    types, shapes = [], []
    for value in placeholder_values(program):
        if isinstance(value, torch.Tensor):
            types.append(str(value.dtype))
            # Static dims stay static; a SymInt dim (a torch.export Dim) is dynamic.
            shapes.append([d if isinstance(d, int) else -1 for d in value.shape])
        else:  # a SymInt input: an int64 scalar
            types.append("int")
            shapes.append([])
    frontend = FrontEndManager().load_by_framework("pytorch")
    # The decoder must outlive convert(): the C++ side calls back into it.
    decoder = TorchFXPythonDecoder(
        _frontend_spelling(program, int8),
        input_shapes=shapes,
        input_types=types,
        dynamic_shapes=False,
    )
    model = frontend.convert(frontend.load(decoder))
    apply_moc_transformations(model, cf=False, smart_reshape=True)
    apply_fused_names_cleanup(model)  # leaves no per-layer rt_info
    return model


def _parameter_roles(program: ExportedProgram) -> dict[str, tuple[str, str | int]]:
    roles: dict[str, tuple[str, str | int]] = {}
    user = 0
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            roles[spec.arg.name] = ("input", user)
            user += 1
        else:  # weight_names() (via the caller) has refused every other kind
            roles[spec.arg.name] = ("weight", spec.target)
    return roles


def convert_segment(program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
    """The segment as a weight-free payload (see the module docstring)."""
    import openvino as ov

    int8 = options(compile_specs).get(PRECISION_SPEC) == INT8
    weight_names(program)  # refuses input kinds nativert cannot lower
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _frontend_convert(program, int8)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise DelegateCompileError(
            f"OpenVINO's PyTorch frontend cannot convert the segment: {type(exc).__name__}: "
            f"{_conversion_failure(str(exc)) or (first[0] if first else '')}"
        ) from exc
    _check_outputs(program, model)
    roles = _parameter_roles(program)
    parameters = []
    for parameter in model.get_parameters():
        name = parameter.get_friendly_name()
        if name not in roles:
            raise DelegateCompileError(
                f"openvino: the converted model has an input {name!r} that is not a "
                f"placeholder of the segment ({sorted(roles)})"
            )
        parameters.append((name, *roles[name]))
    with tempfile.TemporaryDirectory(prefix="nativert-openvino-") as directory:
        xml_path, bin_path = (os.path.join(directory, f"segment.{e}") for e in ("xml", "bin"))
        # ov.serialize, not ov.save_model: save_model compresses float32 constants to
        # float16 by default.
        ov.serialize(model, xml_path, bin_path)
        with open(xml_path, "rb") as f:
            xml = f.read()
        with open(bin_path, "rb") as f:
            blob = f.read()
    payload = pack(Payload(tuple(parameters), len(model.outputs), xml, blob))
    try:  # what we compile must load from a package later, where it is checked
        check_untrusted(payload)
    except ValueError as exc:
        raise DelegateCompileError(f"openvino: the converted IR would be refused: {exc}") from exc
    return payload


def _check_outputs(program: ExportedProgram, model: Any) -> None:
    """The converted model returns what the segment returns: tensors of the same dtypes."""
    outputs = list(program.graph.output_node().args[0])
    if len(outputs) != len(model.outputs):
        raise DelegateCompileError(
            f"openvino: the converted model has {len(model.outputs)} outputs, the segment "
            f"{len(outputs)}"
        )
    for i, (node, port) in enumerate(zip(outputs, model.outputs, strict=True)):
        val = node.meta.get("val") if hasattr(node, "meta") else None
        if not isinstance(val, torch.Tensor):
            raise DelegateCompileError(
                f"openvino: segment output {i} ({node}) is not a tensor; openvino segments "
                "return tensors only"
            )
        got = to_torch_dtype(port.get_element_type())
        if got != val.dtype or got not in DTYPES:
            raise DelegateCompileError(
                f"openvino: segment output {i} ({node.name}) is {val.dtype}, the converted "
                f"model returns {port.get_element_type()}"
            )


def _conversion_failure(message: str) -> str | None:
    """The lines of a frontend error that name the ops it could not convert."""
    lines = [
        line.strip()
        for line in message.splitlines()
        if "aten." in line or "not supported" in line.lower() or "no translator" in line.lower()
    ]
    return "; ".join(lines[:3]) or None

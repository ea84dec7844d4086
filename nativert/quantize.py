"""`nativert.quantize`: PT2E static int8 quantization (torchao), for programs not yet
quantized.

It wraps torchao's PT2E flow: export, `prepare_pt2e` with a quantizer, calibration on the
caller's batches, `convert_pt2e`, export again. The result is an ordinary ExportedProgram
with int8 weights and quantize/dequantize nodes, which `to_backend` lowers onto the
delegates' int8 kernels (the partitioner keeps each quantized op with its Q/DQ).

Schemes (torchao's `X86InductorQuantizer`: int8 weights per output channel, uint8
activations per tensor, static):
- "x86": 8-bit activations. What ONNX Runtime (the default delegate) runs fastest; on CPUs
  without VNNI/AMX it dequantizes weights from uint8 so that its kernels do not saturate.
- "x86_reduce_range": 7-bit activations (0..127), for OpenVINO and oneDNN (inductor) on CPUs
  without VNNI/AMX, whose u8 x s8 kernels saturate on 8-bit activations (measured: 11-15%
  error on an MLP). ONNX Runtime runs these ranges exactly but not on int8 kernels.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert.errors import NativertError

SCHEMES = ("x86", "x86_reduce_range")


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """torchao logs the native kernels it cannot load on a CPU machine (CUTLASS, MXFP8) and
    warns about deprecated torch APIs: none of it is the user's business here."""
    names = ("torchao", "torch._dynamo", "torch.export", "torch.utils._pytree")
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _torchao() -> tuple[Any, Any]:
    """(quantize_pt2e module, x86_inductor_quantizer module), or a clear error."""
    try:
        with _quiet_torchao():
            import torchao.quantization.pt2e.quantize_pt2e as quantize_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as exc:
        raise NativertError(
            f"nativert.quantize needs torchao ({exc}); install it with "
            "pip install 'nativert[quant]' (torchao==0.18.0 for torch 2.13)"
        ) from None
    return quantize_pt2e, x86_inductor_quantizer


def _batches(calibration_inputs: Any) -> list[tuple[Any, ...]]:
    """A list of positional-argument tuples from what the caller gave."""
    if isinstance(calibration_inputs, torch.Tensor):
        return [(calibration_inputs,)]
    if isinstance(calibration_inputs, tuple) and all(
        isinstance(x, torch.Tensor) for x in calibration_inputs
    ):
        return [calibration_inputs]  # one batch of positional arguments
    if isinstance(calibration_inputs, Sequence) and calibration_inputs:
        batches = []
        for i, batch in enumerate(calibration_inputs):
            batch = (batch,) if isinstance(batch, torch.Tensor) else batch
            if not isinstance(batch, tuple):
                raise TypeError(
                    f"calibration batch {i} is a {type(batch).__name__}; each batch is a "
                    "tensor or a tuple of the model's positional arguments"
                )
            batches.append(batch)
        return batches
    raise TypeError(
        "calibration_inputs must be a tensor, a tuple of tensors (one batch) or a non-empty "
        f"list of such batches, got {type(calibration_inputs).__name__}"
    )


def quantize(
    model: torch.nn.Module | ExportedProgram,
    calibration_inputs: Any,
    *,
    scheme: str = "x86",
    dynamic_shapes: Any = None,
) -> ExportedProgram:
    """A PT2E int8 program of `model`, calibrated on `calibration_inputs`.

    model: an nn.Module (exported here, in eval mode) or an ExportedProgram.
    calibration_inputs: a list of batches (each a tensor or a tuple of positional
        arguments), or one batch. Real data gives better scales than random data.
    scheme: see SCHEMES and the module docstring.
    dynamic_shapes: as for torch.export.export (for a module; a program keeps its own).

    Example::

        program = nativert.quantize(model, [x1, x2, x3])
        delegated = nativert.to_backend(program)   # int8 regions, error in the report
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")
    batches = _batches(calibration_inputs)
    quantize_pt2e, x86 = _torchao()
    with _quiet_torchao():
        # A copy: the program must not share tensors with the caller's model (measured: a
        # later in-place change to one, e.g. by inductor's freezing, changed the other).
        if isinstance(model, ExportedProgram):
            dynamic_shapes = _dynamic_shapes_of(model)
            graph_module = copy.deepcopy(model.module())
        elif isinstance(model, torch.nn.Module):
            graph_module = torch.export.export(
                copy.deepcopy(model).eval(), batches[0], dynamic_shapes=dynamic_shapes
            ).module()
        else:
            raise TypeError(f"model must be an nn.Module or ExportedProgram, got {type(model)}")
        # Dead code first: X86InductorQuantizer's linear+unary matcher fails on a dead one
        # (IndexError), e.g. BERT's pooler when only the last hidden state is returned.
        graph_module.graph.eliminate_dead_code()
        graph_module.recompile()
        quantizer = x86.X86InductorQuantizer()
        config = x86.get_default_x86_inductor_quantization_config(
            reduce_range=scheme == "x86_reduce_range"
        )
        quantizer.set_global(config)
        try:
            prepared = quantize_pt2e.prepare_pt2e(graph_module, quantizer)
        except Exception as exc:  # torchao's pattern matching: say whose step failed
            raise NativertError(
                f"nativert.quantize: torchao's X86InductorQuantizer could not annotate this "
                f"model ({type(exc).__name__}: {exc or 'no message'}, in prepare_pt2e). "
                "Quantize it with a quantizer of your own (prepare_pt2e / convert_pt2e) and "
                "pass the program to to_backend"
            ) from exc
        with torch.no_grad():
            for batch in batches:
                prepared(*batch)
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=True)
        _drop_unused_weights(converted)
        return torch.export.export(converted, batches[0], dynamic_shapes=dynamic_shapes)


def _drop_unused_weights(graph_module: torch.fx.GraphModule) -> None:
    """Delete the parameters and buffers no node reads: convert_pt2e folds each quantized
    weight into a new int8 constant and leaves the fp32 original on the module, which export
    would lift as an unused input (4x the int8 weight's bytes, held and saved for nothing)."""
    for node in graph_module.graph.nodes:  # export's _guards_fn holds no weights
        if node.op == "call_module":
            called = graph_module.get_submodule(node.target)
            if any(True for _ in called.parameters()) or any(True for _ in called.buffers()):
                return  # a submodule reads weights of its own: leave them all
    graph_module.graph.eliminate_dead_code()
    read = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(graph_module, f"named_{kind}")()):
            if name in read:
                continue
            owner_name, _, attr = name.rpartition(".")
            owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
            delattr(owner, attr)
    graph_module.recompile()


def _dynamic_shapes_of(program: ExportedProgram) -> Any:
    """The program's dynamic dims as a dynamic_shapes spec (None when all are static)."""
    values = [
        node.meta.get("val")
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in set(program.graph_signature.user_inputs)
    ]
    specs, dynamic = [], False
    for value in values:
        if not isinstance(value, torch.Tensor):
            specs.append(None)
            continue
        dims = {}
        for i, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                dims[i] = torch.export.Dim.AUTO
                dynamic = True
        specs.append(dims or None)
    return tuple(specs) if dynamic else None

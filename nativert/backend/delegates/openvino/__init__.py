"""The `openvino` delegate: segments converted to OpenVINO IR and run by its CPU plugin.

convert: the compile step (OpenVINO's PyTorch frontend, weights left out of the IR);
payload: the payload format and the untrusted-payload check; executor: compiled models,
infer requests and staged weights; support: the table of core ATen ops it runs.

Security (`executes_native_code = False`): an OpenVINO IR is a graph of built-in operations
plus a blob of constants: data, interpreted by OpenVINO's own kernels (the CPU plugin JITs
them from op attributes, as ONNX Runtime picks kernels: OpenVINO's code, not the file's). An
IR could make OpenVINO run foreign code only through operation extensions (shared libraries
loaded by `Core.add_extension`, which nativert never calls) and the custom op types they
register, so `check_payload` (payload.check_untrusted) refuses any layer whose version is
not a standard opset, and also: constants that read outside the payload's blob or whose
size does not match their shape, XML with a DTD or entities, and rt_info beyond the runtime
version (rt_info can carry runtime options that compile_model applies). The IR is read from
memory, so it names no files, and the device ("CPU") and compile options come from nativert,
never from the payload. What is left is the attack surface of any runtime that parses
untrusted models (bugs in OpenVINO's IR reader or kernels), the same as onnxruntime's.

Not a default candidate: name it (`delegates=["openvino"]`) or let autotune time it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert.backend.delegates.openvino import support
from nativert.backend.delegates.openvino.convert import (
    CAPABILITIES,
    SPEC_KEYS,
    THREADS,
    check_int64_weights,
    check_values,
    convert_segment,
)
from nativert.backend.delegates.openvino.executor import OpenVinoExecutor
from nativert.backend.delegates.openvino.payload import check_untrusted
from nativert.delegate import FP32, Availability, CompileSpec, Delegate, package_versions


@functools.cache
def _table():
    return support.build_table()


@functools.cache
def _cpu_precisions() -> tuple[str, ...]:
    """fp32, plus what the CPU plugin computes natively here (bf16 on CPUs with AVX512-BF16
    or AMX; it silently computes f32 when asked for a precision the CPU lacks)."""
    import openvino as ov

    capabilities = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return (FP32, *(p for p, cap in CAPABILITIES.items() if cap in capabilities))


class OpenVinoDelegate(Delegate):
    backend_id = "openvino"
    priority = 250
    default_candidate = False  # used when named, or by autotune
    cacheable = True  # payloads carry no weight data
    thread_spec = THREADS
    compile_spec_keys = SPEC_KEYS
    executes_native_code = False  # an IR of built-in opsets (check_payload)

    def toolchain(self) -> dict[str, str]:
        return package_versions("openvino")

    def precisions(self) -> tuple[str, ...]:
        # INFERENCE_PRECISION_HINT: OpenVINO converts weights and picks its bf16 kernels.
        return _cpu_precisions() if self.is_available() else (FP32,)

    def is_available(self) -> Availability:
        if importlib.util.find_spec("openvino") is None:
            return Availability(
                False, "missing Python package openvino (pip install 'nativert[openvino]')"
            )
        return Availability(True)

    def check_compile_specs(self, specs: Mapping[str, Any]) -> None:
        super().check_compile_specs(specs)
        check_values(specs)

    def check_support(self, node: Node) -> str | None:
        return _table().check(node)

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]:
        return frozenset(support.PRESERVED)

    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        return convert_segment(program, compile_specs)

    def check_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        check_int64_weights(weights)

    def check_payload(self, payload: bytes) -> None:
        check_untrusted(payload)

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> OpenVinoExecutor:
        return OpenVinoExecutor(payload, compile_specs, reference)


__all__ = ["OpenVinoDelegate", "OpenVinoExecutor"]

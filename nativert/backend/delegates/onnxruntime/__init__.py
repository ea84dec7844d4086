"""The `onnxruntime` delegate: segments exported to ONNX and run by ONNX Runtime.

export: the compile step (torch.onnx.export, weights made external); executor: sessions,
IOBindings and staged weights; support: the table of core ATen ops it runs.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program.quant import cpu_has_int8_dot
from nativert.backend.delegates.onnxruntime import support
from nativert.backend.delegates.onnxruntime.executor import OnnxRuntimeExecutor
from nativert.backend.delegates.onnxruntime.export import (
    SPEC_KEYS,
    SPINNING,
    THREADS,
    check_untrusted,
    check_values,
    export,
)
from nativert.delegate import FP32, INT8, Availability, CompileSpec, Delegate, package_versions


@functools.cache
def _table():
    return support.build_table()


class OnnxRuntimeDelegate(Delegate):
    backend_id = "onnxruntime"
    priority = 300
    cacheable = True  # payloads carry no weight data
    thread_spec = THREADS
    compile_spec_keys = frozenset(SPEC_KEYS)
    # Measured (benchmarks/results/executor_overhead.md): between PyTorch ops or other
    # runtimes, spinning ORT threads took their cores (a custom op between two ORT regions
    # ran ~10x slower); alone, spinning is what makes back-to-back calls fast.
    hybrid_compile_specs = {SPINNING: "never"}
    executes_native_code = False  # an ONNX graph of built-in kernels (check_payload)

    def precisions(self) -> tuple[str, ...]:
        # int8: quantized regions (PT2E's Q/DQ) on ORT's QDQ-fused int8 kernels.
        return (FP32, INT8)

    def toolchain(self) -> dict[str, str]:
        """Versions of the exporter and runtime, and whether int8 payloads use unsigned
        weights here (export.py): part of the compile cache key."""
        versions = package_versions("onnx", "onnxscript", "onnxruntime")
        return {**versions, "int8_weights": "s8" if cpu_has_int8_dot() else "u8"}

    def is_available(self) -> Availability:
        missing = [
            m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None
        ]
        if missing:
            return Availability(False, f"missing Python packages: {', '.join(missing)}")
        return Availability(True)

    def check_compile_specs(self, specs: Mapping[str, Any]) -> None:
        super().check_compile_specs(specs)
        check_values(specs)

    def check_support(self, node: Node) -> str | None:
        return _table().check(node)

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]:
        return frozenset(support.PRESERVED)

    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        return export(program, compile_specs)

    def check_payload(self, payload: bytes) -> None:
        check_untrusted(payload)

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> OnnxRuntimeExecutor:
        return OnnxRuntimeExecutor(payload, compile_specs, reference)


__all__ = ["OnnxRuntimeDelegate", "OnnxRuntimeExecutor"]

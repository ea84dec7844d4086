"""The `tensorrt` delegate: segments built into TensorRT engines (CUDA only).

Available only where `torch_tensorrt` and `tensorrt` import and torch sees a CUDA device;
`is_available()` says which is missing, and partitioners never pick it then. Install with
the `tensorrt` extra on a machine whose torch has CUDA.

Compile specs are torch_tensorrt compilation settings (e.g. `enabled_precisions`), plus
nativert's `precision` (fp16 or bf16: enabled beside fp32, TensorRT picks per layer); see
executor.py for how engines are built, run and rebuilt for new weights. Refit in place is
not used yet: the mapping from weight names to the engine's refittable weights is
torch_tensorrt-internal.

Status: written against the documented APIs and not yet run on a GPU (no GPU was lent while
it was built); tests/backend/test_tensorrt.py runs it for real where TensorRT and CUDA exist.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert.backend.delegates.tensorrt.executor import TensorRtExecutor, build_engine
from nativert.delegate import Availability, CompileSpec, Delegate, package_versions


class TensorRtDelegate(Delegate):
    backend_id = "tensorrt"
    priority = 400
    compile_spec_keys = None  # torch_tensorrt compilation settings, checked when it builds
    executes_native_code = True  # an engine: TensorRT deserializes and runs its kernels
    fast_compile = False  # engine builds take seconds to minutes

    def toolchain(self) -> dict[str, str]:
        return package_versions("torch_tensorrt")

    def precisions(self) -> tuple[str, ...]:
        return ("fp32", "fp16", "bf16") if self.is_available() else ("fp32",)

    def is_available(self) -> Availability:
        missing = [m for m in ("tensorrt", "torch_tensorrt") if importlib.util.find_spec(m) is None]
        if missing:
            return Availability(
                False,
                f"{' and '.join(missing)} not installed (pip install 'nativert[tensorrt]' on a "
                "machine with CUDA)",
            )
        if not torch.cuda.is_available():
            return Availability(False, "TensorRT needs a CUDA device, and torch sees none")
        return Availability(True)

    def check_support(self, node: Node) -> str | None:
        vals = [node.meta.get("val")]
        if not all(isinstance(v, torch.Tensor) and v.is_cuda for v in vals):
            return "TensorRT runs CUDA tensors only"
        return None

    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        return build_engine(program, compile_specs)

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> TensorRtExecutor:
        return TensorRtExecutor(payload, compile_specs, reference)


__all__ = ["TensorRtDelegate", "TensorRtExecutor"]

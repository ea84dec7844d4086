"""The `eager` reference delegate: runs a segment's ATen graph in PyTorch.

It supports every op, needs no runtime, and is what every other delegate is checked against.
Its payload is empty: the segment's weight-free reference program is the whole program, run
by `nativert.delegate.ReferenceExecutor`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.export import ExportedProgram
from torch.fx import Node

from nativert.delegate import CompileSpec, Delegate, ReferenceExecutor


class EagerDelegate(Delegate):
    """Reference delegate: every op, in PyTorch."""

    backend_id = "eager"
    priority = 0
    # A reference, not a fast path: default partitioning uses it only when no other delegate
    # is available (delegating to it costs a call and speeds nothing up).
    reference = True
    cacheable = True  # its payload is empty
    executes_native_code = False

    def check_support(self, node: Node) -> str | None:
        return None

    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        return b""

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> ReferenceExecutor:
        return ReferenceExecutor(reference, name=self.backend_id)

"""The `eager` reference delegate: runs a segment's ATen graph in PyTorch.

It supports every op, needs no runtime, and is what every other delegate is checked against.
Its payload is empty: the segment's weight-free reference program is the whole program.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert._program import placeholder_values, unalias_outputs, validate_weights, weight_names
from nativert.backend.delegate import Availability, CompileSpec, StagedWeights


class EagerExecutor(StagedWeights):
    """Runs the reference graph with the committed weights."""

    def __init__(self, reference: ExportedProgram, *, name: str = "eager") -> None:
        self._name = name
        self._graph_module = reference.graph_module
        self.weight_names = weight_names(reference)
        values = placeholder_values(reference)
        self._expected = dict(zip(self.weight_names, values[: len(self.weight_names)], strict=True))
        self._init_state(active=None if self.weight_names else ())

    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        validate_weights(self._expected, weights, owner=f"delegate {self._name!r}")
        # Shared, not copied: the reference graph reads the caller's tensors.
        self._stage(tuple(weights[name] for name in self.weight_names))

    def run_with(self, weights: tuple, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        flat = (*weights, *inputs)
        return unalias_outputs(self._graph_module(*flat), flat)


class EagerDelegate:
    """Reference delegate: every op, in PyTorch."""

    backend_id = "eager"
    version = "1"
    # A reference, not a fast path: default partitioning uses it only when no other delegate
    # is available (delegating to it costs a call and speeds nothing up).
    reference = True

    def is_available(self) -> Availability:
        return Availability(True)

    def check_support(self, node: Node) -> str | None:
        return None

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]:
        return frozenset()

    def preprocess(self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]) -> bytes:
        return b""

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> EagerExecutor:
        return EagerExecutor(reference, name=self.backend_id)

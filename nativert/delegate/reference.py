"""The reference executor: a segment's ATen graph run in PyTorch.

It is the `eager` delegate's executor, and what a lowered module runs when its own delegate
is not available where a package was loaded. Every other delegate is checked against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert._program import placeholder_values, unalias_outputs, validate_weights, weight_names
from nativert.delegate.contract import StagedWeights


class ReferenceExecutor(StagedWeights):
    """Runs the reference graph with the committed weights (shared, never copied)."""

    def __init__(self, reference: ExportedProgram, *, name: str = "eager") -> None:
        self._name = name
        self._graph_module = reference.graph_module
        self.weight_names = weight_names(reference)
        values = placeholder_values(reference)
        self._expected = dict(zip(self.weight_names, values[: len(self.weight_names)], strict=True))
        self._init_state(active=None if self.weight_names else ())

    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        validate_weights(self._expected, weights, owner=f"delegate {self._name!r}")
        self._stage(tuple(weights[name] for name in self.weight_names))

    def run_with(self, weights: tuple, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        flat = (*weights, *inputs)
        return unalias_outputs(self._graph_module(*flat), flat)

"""How far a region computed below fp32 is from the same region in fp32 PyTorch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Errors of one region's outputs against fp32 PyTorch on the example inputs, over every
    floating-point output: the largest absolute error, that divided by the largest |fp32
    output| (`max_rel`, what `Settings.accuracy` bounds) and the signal-to-quantization-noise
    ratio in dB (inf when exact)."""

    max_abs: float
    max_rel: float
    sqnr_db: float

    def text(self) -> str:
        sqnr = "exact" if math.isinf(self.sqnr_db) else f"SQNR {self.sqnr_db:.1f} dB"
        return f"rel err {self.max_rel:.2g}, abs err {self.max_abs:.2g}, {sqnr}"

    def to_json(self) -> list[float | str]:
        return [self.max_abs, self.max_rel, "inf" if math.isinf(self.sqnr_db) else self.sqnr_db]

    @classmethod
    def from_json(cls, data: Any) -> Accuracy:
        """From `to_json`'s list; ValueError for anything else (packages are untrusted)."""
        if not isinstance(data, list) or len(data) != 3:
            raise ValueError(f"accuracy must be [max_abs, max_rel, sqnr_db], got {data!r}")
        values = []
        for value in data:
            if value == "inf":
                value = math.inf
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"accuracy values must be numbers, got {data!r}")
            values.append(float(value))
        return cls(*values)


def measure_accuracy(got: Sequence[Any], expected: Sequence[Any]) -> Accuracy:
    """The error of `got` against `expected` (one region's outputs, in order), over their
    floating-point tensors; other outputs must be equal, else ValueError says which."""
    if len(got) != len(expected):
        raise ValueError(f"{len(got)} outputs, expected {len(expected)}")
    max_abs = scale = signal = noise = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != e.shape or g.dtype != e.dtype:
            raise ValueError(
                f"output {i} is {getattr(g, 'dtype', type(g).__name__)}"
                f"{list(getattr(g, 'shape', []))}, expected {e.dtype}{list(e.shape)}"
            )
        if not e.dtype.is_floating_point:
            if not torch.equal(g, e):
                raise ValueError(f"output {i} ({e.dtype}) differs")
            continue
        if not e.numel():
            continue
        e64, g64 = e.detach().double(), g.detach().double()
        if not torch.equal(torch.isfinite(e64), torch.isfinite(g64)):
            return Accuracy(math.inf, math.inf, -math.inf)
        finite = torch.isfinite(e64)
        diff = (g64 - e64)[finite]
        max_abs = max(max_abs, float(diff.abs().max()) if diff.numel() else 0.0)
        scale = max(scale, float(e64[finite].abs().max()) if diff.numel() else 0.0)
        signal += float((e64[finite] ** 2).sum())
        noise += float((diff**2).sum())
    max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal else -math.inf)
    return Accuracy(max_abs, max_rel, sqnr)

"""Quiet by default: what torch and its exporters print about themselves while nativert works.

`quiet()` is entered around nativert's own calls (the lowering pipeline), never globally, and
restores everything on exit. It hides only messages that say nothing about the user's model:

- torch's FutureWarning "isinstance(treespec, LeafSpec) is deprecated", raised from torch's
  own copies of pytree specs inside `run_decompositions` (2-3 per lowering);
- torch.onnx's registry line "torchvision is not installed. Skipping torchvision::nms" (four
  per ONNX export when torchvision is absent, which is the normal case for nativert).

ONNX Runtime's C++ log is set per session (the onnxruntime delegate's `log_severity_level`
compile spec, default 3: errors only); warnings about the model (nativert's own, a region
that failed to compile) are not touched.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator

_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration",)


@contextlib.contextmanager
def logger_levels(names: Iterable[str], level: int) -> Iterator[None]:
    """The loggers `names` at `level` while active; their own levels restored after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels, strict=True):
            logger.setLevel(old)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings(), logger_levels(_QUIET_LOGGERS, logging.ERROR):
        warnings.filterwarnings(
            "ignore", message=r"`?isinstance\(treespec, LeafSpec\)`? is deprecated"
        )
        yield

"""Exceptions raised by nativert. Every message names the node, input or file involved."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colours (ONNX Runtime's
    and OpenVINO's errors carry ANSI codes)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else ""


class NativertError(Exception):
    """Base class of every error nativert raises on purpose."""


class UnknownDelegateError(NativertError, KeyError):
    """A backend id that no registered delegate answers to."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class DelegateUnavailableError(NativertError):
    """The delegate exists but its runtime cannot be used on this machine."""


class DelegateCompileError(NativertError):
    """A delegate failed to compile (preprocess) a segment."""


class DelegateLoadError(NativertError):
    """A delegate could not load a segment's payload into an executor."""


class PartitionError(NativertError):
    """A partitioner produced tags that cannot be lowered."""


class LoweringError(NativertError):
    """A program could not be lowered (unsupported node, bad signature, ...)."""


class DelegateCallError(NativertError, TypeError):
    """A lowered module or delegate executor was called with the wrong inputs."""


class WeightsError(NativertError, ValueError):
    """Weights given to a delegate do not match what it was compiled for."""


class SettingsError(NativertError, ValueError):
    """A setting (to_backend keyword, torch.compile option, CLI flag) with a bad name or
    value: the message names the setting and says what it takes."""


class PackageError(NativertError):
    """A .pt2 file that nativert cannot load: names the file and what is wrong."""

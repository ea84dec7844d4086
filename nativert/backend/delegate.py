"""The two delegate contracts and the registry that maps backend ids to delegates.

A *delegate* is a backend at compile time: it says which nodes it can run, which ops it wants
kept whole by decomposition, and turns a segment (an ExportedProgram) into payload bytes.
A *delegate executor* is the same backend at run time, built from those bytes: it owns its
compiled payload and weights and runs flat lists of tensors.

Third-party delegates register through `register_delegate` (or, later, an entry point).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from nativert.errors import (
    DelegateUnavailableError,
    NativertError,
    UnknownDelegateError,
    WeightsError,
)

JSONValue = Any  # str | int | float | bool | None | list | dict of those


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One named compile option for a delegate. Values must be JSON-serialisable."""

    key: str
    value: JSONValue


def dict_to_specs(options: Mapping[str, JSONValue] | None) -> list[CompileSpec]:
    return [CompileSpec(key, value) for key, value in sorted((options or {}).items())]


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether a delegate's runtime can be used here; falsy with the reason when it cannot."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@runtime_checkable
class DelegateExecutor(Protocol):
    """A delegate at run time. Built once per payload by `Delegate.load`.

    Weights are named by the segment's input targets (the original FQNs). `run` takes the
    segment's non-weight inputs in order and returns a tuple of *new* tensors: outputs never
    alias inputs, weights or each other (callers rely on it, as torch's HOP tracing does).
    """

    def init_weights(self, weights: Mapping[str, torch.Tensor]) -> None: ...

    def process_weights(self, weights: Mapping[str, torch.Tensor]) -> None: ...

    def commit_weights(self) -> None: ...

    def run(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]: ...


@runtime_checkable
class Delegate(Protocol):
    """A delegate at compile time."""

    backend_id: str
    version: str

    def is_available(self) -> Availability: ...

    def check_support(self, node: Node) -> str | None:
        """None when this delegate can run `node`, else a short reason why not."""
        ...

    def ops_to_preserve(self) -> frozenset[torch._ops.OpOverload]: ...

    def preprocess(
        self, program: ExportedProgram, compile_specs: Sequence[CompileSpec]
    ) -> bytes: ...

    def load(
        self,
        payload: bytes,
        compile_specs: Sequence[CompileSpec],
        *,
        reference: ExportedProgram,
    ) -> DelegateExecutor: ...


class StagedWeights:
    """The weight life cycle shared by executors: stage, then switch atomically.

    Subclasses build their run state from weights in `process_weights` and hand it to
    `_stage`; `commit_weights` makes it active; `run` reads it once with `_active_state()`,
    so a concurrent commit never tears a call.
    """

    _name: str = "delegate"
    weight_names: tuple[str, ...] = ()

    def _init_state(self, active: Any = None) -> None:
        self._active = active
        self._staged: Any = None
        self._stage_lock = threading.Lock()

    def init_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.process_weights(weights)  # type: ignore[attr-defined]
        self.commit_weights()

    def _stage(self, state: Any) -> None:
        with self._stage_lock:
            self._staged = state

    def commit_weights(self) -> None:
        with self._stage_lock:
            if self._staged is None:
                raise WeightsError(
                    f"delegate {self._name!r}: commit_weights() called with nothing staged; "
                    "call process_weights(weights) first"
                )
            self._activate(self._staged)
            self._staged = None

    def _activate(self, staged: Any) -> None:
        """Make `staged` the active state (called by commit_weights, under the stage lock);
        executors whose runtime must switch too (e.g. swap buffers) extend this."""
        self._active = staged

    def discard_weights(self) -> None:
        """Drop staged weights without committing them."""
        with self._stage_lock:
            self._staged = None

    def _active_state(self) -> Any:
        state = self._active
        if state is None:
            raise WeightsError(
                f"delegate {self._name!r}: run() before init_weights(); it needs "
                f"{list(self.weight_names)}"
            )
        return state

    def active_state(self) -> Any:
        """The committed state; pass it to `run_with` to run on exactly that snapshot."""
        return self._active_state()

    def run(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        return self.run_with(self._active_state(), inputs)


# Registry: an explicit dict, filled by register_delegate calls (the built-in ones in
# nativert/backend/delegates/__init__.py), in priority order (fastest first).
_REGISTRY: dict[str, Delegate] = {}


def register_delegate(delegate: Delegate, *, replace: bool = False) -> Delegate:
    """Make `delegate` available under `delegate.backend_id`.

    Registering an id twice is an error unless `replace=True`. Returns the delegate.
    """
    if not isinstance(delegate, Delegate):
        missing = [
            name
            for name in (
                "backend_id",
                "version",
                "is_available",
                "check_support",
                "ops_to_preserve",
                "preprocess",
                "load",
            )
            if not hasattr(delegate, name)
        ]
        raise NativertError(
            f"{delegate!r} is not a nativert Delegate: it lacks {', '.join(missing)}"
        )
    backend_id = delegate.backend_id
    if not isinstance(backend_id, str) or not backend_id:
        raise NativertError(f"delegate {delegate!r} has an invalid backend_id {backend_id!r}")
    if backend_id in _REGISTRY and not replace:
        raise NativertError(
            f"a delegate with backend_id {backend_id!r} is already registered "
            f"({_REGISTRY[backend_id]!r}); pass replace=True to replace it"
        )
    _REGISTRY[backend_id] = delegate
    return delegate


def unregister_delegate(backend_id: str) -> Delegate:
    """Remove a registered delegate and return it."""
    return _REGISTRY.pop(get_delegate(backend_id).backend_id)


def get_delegate(backend_id: str) -> Delegate:
    """The delegate registered as `backend_id`; the error lists the known ids."""
    try:
        return _REGISTRY[backend_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownDelegateError(
            f"unknown delegate backend_id {backend_id!r}; registered delegates: {known}"
        ) from None


def list_delegates(*, available_only: bool = False) -> list[str]:
    """Backend ids in priority order (fastest first)."""
    return [
        backend_id
        for backend_id, delegate in _REGISTRY.items()
        if not available_only or delegate.is_available()
    ]


def toolchain_versions(delegate: Delegate) -> dict[str, str]:
    """Versions of the tools a delegate compiles with (its optional `toolchain()`)."""
    toolchain = getattr(delegate, "toolchain", None)
    return dict(toolchain()) if toolchain is not None else {}


def require_available(delegate: Delegate) -> None:
    availability = delegate.is_available()
    if not availability:
        raise DelegateUnavailableError(
            f"delegate {delegate.backend_id!r} is not available here: {availability.reason}"
        )

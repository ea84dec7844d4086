"""The delegate registry: backend ids -> delegates, in an explicit priority order.

Built-in delegates are registered by `nativert/__init__`; third-party ones arrive through
the `nativert_delegates` entry point group (loaded on the first lookup) or through
`register_delegate`. Order is `Delegate.priority`, higher first, then backend id: never the
order of registration.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nativert.delegate.contract import Delegate
from nativert.errors import DelegateUnavailableError, NativertError, UnknownDelegateError

ENTRY_POINT_GROUP = "nativert_delegates"
logger = logging.getLogger("nativert")

_REGISTRY: dict[str, Delegate] = {}
# Entry points that could not be registered: name -> why (shown when someone asks for it).
_BROKEN: dict[str, str] = {}
_entry_points_loaded = False
_lock = threading.RLock()


def register_delegate(delegate: Delegate, *, replace: bool = False) -> Delegate:
    """Make `delegate` available under `delegate.backend_id`; returns it.

    Registering an id twice is an error unless `replace=True`.
    """
    if not isinstance(delegate, Delegate):
        kind = "class" if isinstance(delegate, type) else type(delegate).__name__
        raise NativertError(
            f"{delegate!r} ({kind}) is not a nativert Delegate: register an instance of a "
            "subclass of nativert.Delegate"
        )
    backend_id = delegate.backend_id
    if not isinstance(backend_id, str) or not backend_id:
        raise NativertError(f"delegate {type(delegate).__name__} has no backend_id")
    with _lock:
        if backend_id in _REGISTRY and not replace:
            raise NativertError(
                f"a delegate with backend_id {backend_id!r} is already registered "
                f"({_REGISTRY[backend_id]!r}); pass replace=True to replace it"
            )
        _REGISTRY[backend_id] = delegate
    return delegate


def unregister_delegate(backend_id: str) -> Delegate:
    """Remove a registered delegate and return it."""
    with _lock:
        return _REGISTRY.pop(get_delegate(backend_id).backend_id)


def is_registered(backend_id: str) -> bool:
    """Whether `backend_id` is registered now (entry points not loaded for this)."""
    return backend_id in _REGISTRY


def get_delegate(backend_id: str) -> Delegate:
    """The delegate registered as `backend_id`; the error lists the known ids."""
    _load_entry_points()
    try:
        return _REGISTRY[backend_id]
    except KeyError:
        known = ", ".join(list_delegates()) or "(none)"
        broken = "".join(
            f"; entry point {name!r} failed to load: {why}" for name, why in _BROKEN.items()
        )
        raise UnknownDelegateError(
            f"unknown delegate backend_id {backend_id!r}; registered delegates: {known}{broken}"
        ) from None


def list_delegates(*, available_only: bool = False) -> list[str]:
    """Backend ids in priority order (higher `priority` first, then by id)."""
    _load_entry_points()
    with _lock:
        delegates = sorted(_REGISTRY.values(), key=lambda d: (-d.priority, d.backend_id))
    return [d.backend_id for d in delegates if not available_only or d.is_available()]


def default_delegates(precision: str = "fp32") -> list[Delegate]:
    """The candidates when nobody names delegates: every available delegate that is a
    default candidate, in priority order; reference delegates only when nothing else is.
    Under a lower `precision`, the available delegates that offer it and compile fast come
    first (a runtime that computes in bf16 is what the setting asks for)."""
    available = [get_delegate(b) for b in list_delegates(available_only=True)]
    candidates = [d for d in available if d.default_candidate]
    candidates = [d for d in candidates if not d.reference] or candidates
    if precision == "fp32":
        return candidates
    first = [
        d for d in available if precision in d.precisions() and d.fast_compile and not d.reference
    ]
    return first + [d for d in candidates if d not in first]


def require_available(delegate: Delegate) -> None:
    availability = delegate.is_available()
    if not availability:
        raise DelegateUnavailableError(
            f"delegate {delegate.backend_id!r} is not available here: {availability.reason}"
        )


def _load_entry_points() -> None:
    """Register the delegates of the `nativert_delegates` entry point group, once.

    An entry point names a Delegate subclass, an instance, or a function returning one. One
    that fails to load or to register is logged and named in "unknown delegate" errors; it
    never breaks nativert for the others.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True  # before loading: a plugin may look delegates up
        from importlib.metadata import entry_points

        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                register_delegate(_instantiate(entry.load()))
            except Exception as exc:  # reported, not raised: one bad plugin
                why = f"{type(exc).__name__}: {exc}"
                _BROKEN[entry.name] = why
                logger.warning(
                    "nativert: delegate entry point %r (%s) was not registered: %s",
                    entry.name,
                    entry.value,
                    why,
                )


def _instantiate(obj: Any) -> Delegate:
    """A Delegate instance as is; a Delegate subclass or a factory, called."""
    if isinstance(obj, Delegate):
        return obj
    return obj() if callable(obj) else obj  # register_delegate says what is wrong

"""Built-in delegates, registered in priority order (fastest first).

Registering is explicit: `register_builtin_delegates()` is called once by `nativert/__init__`.
"""

from __future__ import annotations

from nativert.backend.delegate import _REGISTRY, register_delegate
from nativert.backend.delegates.eager import EagerDelegate, EagerExecutor


def register_builtin_delegates() -> None:
    for delegate in (EagerDelegate(),):
        if delegate.backend_id not in _REGISTRY:
            register_delegate(delegate)


__all__ = ["EagerDelegate", "EagerExecutor", "register_builtin_delegates"]

"""Built-in delegates, registered in priority order (fastest first).

Registering is explicit: `register_builtin_delegates()` is called once by `nativert/__init__`.
"""

from __future__ import annotations

from nativert.backend.delegate import _REGISTRY, register_delegate
from nativert.backend.delegates.eager import EagerDelegate, EagerExecutor
from nativert.backend.delegates.onnxruntime import OnnxRuntimeDelegate


def register_builtin_delegates() -> None:
    # Fastest first: the default partitioner prefers the first available delegate.
    for delegate in (OnnxRuntimeDelegate(), EagerDelegate()):
        if delegate.backend_id not in _REGISTRY:
            register_delegate(delegate)


__all__ = ["EagerDelegate", "EagerExecutor", "OnnxRuntimeDelegate", "register_builtin_delegates"]

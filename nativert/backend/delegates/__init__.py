"""Built-in delegates, registered in priority order (fastest first).

Registering is explicit: `register_builtin_delegates()` is called once by `nativert/__init__`.
"""

from __future__ import annotations

from nativert.backend.delegate import _REGISTRY, register_delegate
from nativert.backend.delegates.aoti import AotiDelegate, AotiExecutor
from nativert.backend.delegates.eager import EagerDelegate, EagerExecutor
from nativert.backend.delegates.onnxruntime import OnnxRuntimeDelegate
from nativert.backend.delegates.tensorrt import TensorRtDelegate


def register_builtin_delegates() -> None:
    # Fastest first: the default partitioner prefers the first available delegate (aoti only
    # when asked for: it is not a default candidate).
    builtins = (TensorRtDelegate(), OnnxRuntimeDelegate(), AotiDelegate(), EagerDelegate())
    for delegate in builtins:
        if delegate.backend_id not in _REGISTRY:
            register_delegate(delegate)


__all__ = [
    "AotiDelegate",
    "AotiExecutor",
    "EagerDelegate",
    "EagerExecutor",
    "OnnxRuntimeDelegate",
    "TensorRtDelegate",
    "register_builtin_delegates",
]

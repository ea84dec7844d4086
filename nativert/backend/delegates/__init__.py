"""The built-in delegates, one module (or folder) each.

`register_builtin_delegates()` is called once by `nativert/__init__`; the registry orders
delegates by their `priority`, not by the order they are registered in.
"""

from __future__ import annotations

from nativert.backend.delegates.aoti import AotiDelegate
from nativert.backend.delegates.eager import EagerDelegate
from nativert.backend.delegates.onnxruntime import OnnxRuntimeDelegate
from nativert.backend.delegates.openvino import OpenVinoDelegate
from nativert.backend.delegates.tensorrt import TensorRtDelegate
from nativert.delegate import Delegate, is_registered, register_delegate

BUILTIN_DELEGATES: tuple[type[Delegate], ...] = (
    TensorRtDelegate,
    OnnxRuntimeDelegate,
    OpenVinoDelegate,
    AotiDelegate,
    EagerDelegate,
)


def register_builtin_delegates() -> None:
    for cls in BUILTIN_DELEGATES:
        if not is_registered(cls.backend_id):
            register_delegate(cls())


__all__ = [
    "BUILTIN_DELEGATES",
    "AotiDelegate",
    "EagerDelegate",
    "OnnxRuntimeDelegate",
    "OpenVinoDelegate",
    "TensorRtDelegate",
    "register_builtin_delegates",
]

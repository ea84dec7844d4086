"""Serve a `.pt2` package beyond one process: Ray Serve replicas, each with one Executor,
dynamic batching along dim 0, and weight swaps committed on every replica or none.

Needs the `serve` extra (`pip install 'nativert[serve]'`, which installs `ray[serve]`).

handle = nativert.serve.deploy("model.pt2", replicas=2)
prediction = handle.remote(x).result()   # .outputs, .weights_version, .replica, .batch_size
handle.update_weights("new.safetensors") # every replica, or none
"""

from nativert.serve.deploy import ServeHandle, deploy, require_serve_extra, start_ray
from nativert.serve.model import PackageModel, Prediction, RequestError

__all__ = [
    "PackageModel",
    "Prediction",
    "RequestError",
    "ServeHandle",
    "deploy",
    "require_serve_extra",
    "start_ray",
]

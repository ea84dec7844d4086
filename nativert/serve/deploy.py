"""`deploy(path, ...)`: start (or join) a Ray cluster, deploy a package on Ray Serve, and
return a handle for Python callers, fleet-wide weight updates and shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from nativert._quiet import logger_levels
from nativert.errors import NativertError, WeightsError

NAMESPACE = "nativert"
# Serve's own log level for what our calls start (controller, proxy, replicas): warnings.
_SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Ray's driver-side INFO lines ("Started Serve", "Application is ready") while our calls
    run; the user's own logging configuration is restored after."""
    with logger_levels(("ray", "ray.serve"), logging.WARNING):
        yield


def require_serve_extra() -> None:
    """Raise ImportError naming the missing package and the extra that installs it, unless
    what serving needs (Ray Serve, safetensors) is installed."""
    try:
        import ray.serve  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as exc:
        missing = (exc.name or "ray").split(".")[0]
        raise ImportError(
            f"serving needs Ray Serve and safetensors, and {missing} is not installed: "
            "pip install 'nativert[serve]'",
            name=missing,
        ) from None


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a local one (no dashboard, Ray's worker logs
    kept off this terminal); nothing if Ray is already initialized in this process."""
    require_serve_extra()
    import ray

    if ray.is_initialized():
        return
    with quiet_ray():
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )


@dataclasses.dataclass
class ServeHandle:
    """A deployed package. `remote(*tensors)` returns a Ray Serve response (`.result()`, or
    `await` it) holding a `Prediction`; `update_weights` swaps weights on every replica."""

    name: str
    url: str
    deployment: Any  # ray.serve.handle.DeploymentHandle
    coordinator: Any  # the WeightCoordinator actor

    def remote(self, *tensors: torch.Tensor):
        return self.deployment.predict.remote(*tensors)

    def metadata(self) -> dict:
        return self.deployment.metadata.remote().result()

    def update_weights(
        self, weights: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> int:
        """Stage `weights` (a state_dict or a .safetensors file) on every replica; commit on
        all only if all staged. Returns the new version; raises WeightsError (nothing
        committed) otherwise."""
        import ray

        if not isinstance(weights, Mapping):
            from safetensors.torch import load_file

            weights = load_file(os.fspath(weights))
        result = ray.get(self.coordinator.update.remote(dict(weights), strict))
        if not result["ok"]:
            raise WeightsError(result["error"])
        return result["version"]

    def status(self) -> dict:
        """The committed version and each live replica's version."""
        import ray

        return ray.get(self.coordinator.status.remote())

    def shutdown(self) -> None:
        """Delete the application and its coordinator (Serve itself keeps running)."""
        import ray
        from ray import serve

        with quiet_ray():
            serve.delete(self.name)
            with contextlib.suppress(Exception):
                ray.kill(self.coordinator)


def deploy(
    path: str | os.PathLike,
    *,
    replicas: int = 1,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    threads: int = 1,
    trust_native_code: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = "nativert",
    route_prefix: str = "/",
) -> ServeHandle:
    """Deploy the package at `path` on Ray Serve with `replicas` replicas, each running it in
    one Executor from `threads` threads; requests are batched up to `max_batch_size` within
    `batch_wait_ms` when the program's dim 0 is dynamic. Starts a local Ray cluster (or joins
    `address`) if this process has none, and Serve's HTTP proxy on `host:port`.

    handle = nativert.serve.deploy("model.pt2", replicas=2)
    print(handle.remote(torch.randn(4, 16)).result().outputs)
    """
    require_serve_extra()
    import ray
    from ray import serve

    from nativert.backend.package import load
    from nativert.serve.model import PackageModel
    from nativert.serve.replica import PackageServer
    from nativert.serve.weights import WeightCoordinator, coordinator_name

    for field, value in (
        ("replicas", replicas),
        ("max_batch_size", max_batch_size),
        ("threads", threads),
    ):
        if value < 1:
            raise NativertError(f"deploy: {field} must be >= 1, got {value}")
    path = os.path.abspath(os.fspath(path))
    # Fail here, in one line, rather than in N replicas that Serve restarts: the same load
    # each replica will do.
    program = load(path, trust_native_code=trust_native_code, plain_containers=True)
    PackageModel(program)
    start_ray(address)
    with quiet_ray():
        serve.start(http_options={"host": host, "port": port}, logging_config=_SERVE_LOGGING)
        cname = coordinator_name(name)
        with contextlib.suppress(ValueError):  # a coordinator left by an earlier deploy
            ray.kill(ray.get_actor(cname, namespace=NAMESPACE))
        coordinator = WeightCoordinator.options(
            name=cname, namespace=NAMESPACE, lifetime="detached"
        ).remote()
        app = PackageServer.options(
            num_replicas=replicas,
            max_ongoing_requests=max(64, 4 * max_batch_size * threads),
            ray_actor_options={"num_cpus": 0},
            logging_config=_SERVE_LOGGING,
        ).bind(
            path,
            coordinator=cname,
            namespace=NAMESPACE,
            trust_native_code=trust_native_code,
            threads=threads,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
        )
        try:
            deployment = serve.run(
                app, name=name, route_prefix=route_prefix, logging_config=_SERVE_LOGGING
            )
        except Exception as exc:
            ray.kill(coordinator)
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise NativertError(
                f"replicas of {path} failed to start: {lines[-1] if lines else exc}"
            ) from exc
        # The first call builds the handle's router, which logs at INFO: here, quietly.
        deployment.metadata.remote().result()
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    return ServeHandle(name, url, deployment, coordinator)

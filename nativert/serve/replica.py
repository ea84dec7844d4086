"""The Ray Serve deployment: each replica loads the package once into an Executor and answers
HTTP requests and handle calls, batching requests along dim 0 where the program allows it.

HTTP (route prefix `/`):
- `GET /` or `/metadata`: inputs, outputs, delegates, batching, weights version, replica.
- `POST /` or `/predict`: JSON (`Content-Type: application/json`) or safetensors (any other
  content type) in; the same format out (`?format=json|safetensors` to choose). Bad inputs get
  400 naming the input.
- `POST /weights`: a safetensors file of new weights, staged on every replica and committed
  on all or none (see weights.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from nativert.serve.model import (
    PackageModel,
    Prediction,
    RequestError,
    split_batch,
    tensor_json,
)
from nativert.serve.weights import follow


@serve.deployment
class PackageServer:
    def __init__(
        self,
        path: str,
        *,
        coordinator: str,
        namespace: str,
        trust_native_code: bool,
        threads: int,
        max_batch_size: int,
        batch_wait_ms: float,
    ) -> None:
        from nativert.backend.package import load, read_manifest
        from nativert.backend.runtime import Executor

        self._stop = threading.Event()  # first: __del__ runs even if loading fails
        manifest = read_manifest(path)
        program = load(path, trust_native_code=trust_native_code, plain_containers=True)
        self.executor = Executor(program, num_frames=threads)
        self.model = PackageModel(program, manifest.get("dim_names"))
        self.delegates = [
            {"name": d["module_name"], "backend_id": d["backend_id"]} for d in manifest["delegates"]
        ]
        self.package = os.path.basename(path)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="nativert-serve")
        self.batching = self.model.batching.enabled and max_batch_size > 1
        self.max_batch_size = max_batch_size
        self.batch_wait_ms = batch_wait_ms
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.batch_sizes: dict[int, int] = {}
        self.coordinator = ray.get_actor(coordinator, namespace=namespace)
        after, version, committed = ray.get(self.coordinator.register.remote(self.replica))
        if committed is not None:  # the fleet moved on while this replica was away
            self.executor.update_weights(ray.get(committed[0]), version=version)
        threading.Thread(
            target=follow,
            args=(self.coordinator, self.replica, after, self.executor, self._stop),
            daemon=True,
            name="nativert-weights",
        ).start()

    def __del__(self) -> None:
        self._stop.set()

    # -- running ---------------------------------------------------------------------------
    def _run_one(self, tensors: list[torch.Tensor]) -> Prediction:
        args, kwargs = self.model.arguments(tensors)
        with torch.no_grad():
            outputs, version = self.executor.call_versioned(*args, **kwargs)
        return Prediction(outputs, version, self.replica, 1)

    def _run_batch(self, items: list[list[torch.Tensor]]) -> list[Prediction]:
        """Concatenate along dim 0 the requests that agree on the other dims and dtypes (at
        most the dim's upper bound of rows per call), run each group once, split back."""
        groups: dict[tuple, list[int]] = {}
        for i, tensors in enumerate(items):
            key = tuple((t.dtype, tuple(t.shape[1:])) for t in tensors)
            groups.setdefault(key, []).append(i)
        limit = self.model.batching.max_rows
        results: list[Any] = [None] * len(items)
        for members in groups.values():
            chunk: list[int] = []
            rows = 0
            chunks = []
            for i in members:
                n = items[i][0].shape[0]
                if chunk and limit is not None and rows + n > limit:
                    chunks.append(chunk)
                    chunk, rows = [], 0
                chunk.append(i)
                rows += n
            chunks.append(chunk)
            for chunk in chunks:
                inputs = [
                    torch.cat([items[i][k] for i in chunk]) for k in range(len(items[chunk[0]]))
                ]
                args, kwargs = self.model.arguments(inputs)
                with torch.no_grad():
                    outputs, version = self.executor.call_versioned(*args, **kwargs)
                sizes = [items[i][0].shape[0] for i in chunk]
                for i, part in zip(chunk, split_batch(outputs, sizes), strict=True):
                    results[i] = Prediction(part, version, self.replica, len(chunk))
                self.batch_sizes[len(chunk)] = self.batch_sizes.get(len(chunk), 0) + 1
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def _batched(self, items: list[list[torch.Tensor]]) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._run_batch, items)

    async def predict(self, *tensors: torch.Tensor) -> Prediction:
        """The handle API: tensors in input order; a Prediction out."""
        tensors = list(tensors)
        self.model.arguments(tensors)  # a bad request fails alone, before it joins a batch
        if self.batching:
            return await self._batched(tensors)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._run_one, tensors)

    # -- metadata and weights --------------------------------------------------------------
    def metadata(self) -> dict:
        info = self.model.metadata()
        info["batching"].update(
            enabled=self.batching,
            max_batch_size=self.max_batch_size,
            batch_wait_ms=self.batch_wait_ms,
            batch_sizes_seen={str(k): v for k, v in sorted(self.batch_sizes.items())},
        )
        return {
            "package": self.package,
            **info,
            "delegates": self.delegates,
            "weights_version": self.executor.weights_version,
            "replica": self.replica,
        }

    async def update_weights(self, body: bytes, strict: bool = True) -> dict:
        from safetensors.torch import load

        try:
            state_dict = load(body)
        except Exception as exc:  # safetensors raises its own error types for bad bytes
            return {"ok": False, "status": 400, "error": f"not a safetensors file: {exc}"}
        return await self.coordinator.update.remote(state_dict, strict)

    # -- HTTP ------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        # Relative to the route prefix (Serve passes it as the ASGI root_path).
        root = request.scope.get("root_path", "").rstrip("/")
        path = request.url.path.removeprefix(root).strip("/")
        if request.method == "GET" and path in ("", "metadata"):
            return JSONResponse(self.metadata())
        if request.method == "POST" and path == "weights":
            strict = request.query_params.get("strict", "true").lower() != "false"
            result = await self.update_weights(await request.body(), strict)
            return JSONResponse(result, status_code=result.get("status", 200))
        if request.method != "POST" or path not in ("", "predict"):
            return JSONResponse(
                {"error": f"no {request.method} {request.url.path}; try GET / or POST /predict"},
                status_code=404,
            )
        body = await request.body()
        is_json = request.headers.get("content-type", "").startswith("application/json")
        answer = request.query_params.get("format", "json" if is_json else "safetensors")
        try:
            tensors = (
                self.model.decode_json(body) if is_json else self.model.decode_safetensors(body)
            )
            prediction = await self.predict(*tensors)
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        named = self.model.named_outputs(prediction.outputs)
        headers = {
            "x-weights-version": str(prediction.weights_version),
            "x-replica": prediction.replica,
            "x-batch-size": str(prediction.batch_size),
        }
        if answer == "json":
            return JSONResponse(
                {
                    "outputs": {name: tensor_json(t) for name, t in named.items()},
                    "weights_version": prediction.weights_version,
                    "replica": prediction.replica,
                    "batch_size": prediction.batch_size,
                },
                headers=headers,
            )
        from safetensors.torch import save

        metadata = {k.removeprefix("x-"): v for k, v in headers.items()}
        data = save({k: t.contiguous() for k, t in named.items()}, metadata=metadata)
        return Response(data, media_type="application/octet-stream", headers=headers)

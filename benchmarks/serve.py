"""HTTP serving overhead: nativert.serve on Ray Serve against one in-process Executor.

    python benchmarks/serve.py [--requests 2000] [--clients 16]

The MLP of benchmarks/models.py (3x Linear(512), ReLU), exported with a dynamic batch dim and
lowered to ONNX Runtime; each request is one row (1x512 float32, safetensors in and out, as a
client that sends tensors would). `--clients` threads in this process each send requests
back to back over a kept-alive connection. Configurations: 1 and 2 replicas, batching off
(max batch 1) and on (max batch 16 within 2 ms); the baseline calls an in-process Executor
from the same number of threads with the same rows. Reported: throughput, and latency p50/p99
as the client sees it. Writes benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import tempfile
import threading
import time
from pathlib import Path

import ray
import requests
import torch
from _harness import machine, write
from ray import serve
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.export import Dim

import nativert
import nativert.serve

CONFIGS = [  # (replicas, max_batch_size)
    (1, 1),
    (1, 16),
    (2, 1),
    (2, 16),
]


class MLP(torch.nn.Module):
    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
        )

    def forward(self, x):
        return self.layers(x)


def drive(call, clients: int, total: int) -> dict:
    """`call()` from `clients` threads, `total` calls in all; latency percentiles (ms) and
    throughput (requests/s)."""
    per = total // clients
    samples: list[float] = []
    lock = threading.Lock()

    def worker():
        state = {}
        mine = []
        for _ in range(per):
            start = time.perf_counter()
            call(state)
            mine.append(time.perf_counter() - start)
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    samples.sort()

    def pct(p):
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] * 1e3

    return {"rps": len(samples) / wall, "p50_ms": pct(50), "p99_ms": pct(99), "n": len(samples)}


def sizes(seen: dict | None) -> str:
    """The batch sizes a replica ran, busiest first (the replica that answered metadata)."""
    if not seen:
        return "-"
    top = sorted(seen.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{k}: {v}" for k, v in top)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(1, 512)
    ep = torch.export.export(
        model, (torch.randn(2, 512),), dynamic_shapes=({0: Dim("batch", max=1024)},)
    )
    program = nativert.to_backend(ep)
    path = Path(tempfile.mkdtemp()) / "mlp.pt2"
    nativert.save(program, str(path))
    with torch.no_grad():
        expected = model(x)
    body = st_save({"x": x})

    rows = []
    executor = nativert.Executor(nativert.load(str(path)))

    def local(state):
        with torch.no_grad():
            executor(x)

    drive(local, args.clients, args.requests // 4)  # warm-up
    rows.append(("in-process Executor", "-", drive(local, args.clients, args.requests)))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    url = f"http://127.0.0.1:{port}/predict"

    def http(state):
        session = state.setdefault("session", requests.Session())
        answer = session.post(
            url, data=body, headers={"content-type": "application/octet-stream"}, timeout=60
        )
        answer.raise_for_status()
        state["last"] = answer.content

    try:
        for replicas, batch in CONFIGS:
            handle = nativert.serve.deploy(
                path, replicas=replicas, max_batch_size=batch, batch_wait_ms=2, port=port
            )
            check = {}
            http(check)
            torch.testing.assert_close(st_load(check["last"])["output"], expected)
            drive(http, args.clients, args.requests // 4)  # warm-up
            result = drive(http, args.clients, args.requests)
            seen = handle.metadata()["batching"]["batch_sizes_seen"]
            result["batch_sizes_seen"] = seen
            rows.append((f"HTTP, {replicas} replica(s)", "on" if batch > 1 else "off", result))
            handle.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()

    date = datetime.date.today().isoformat()
    lines = [
        f"# Serving overhead ({date})",
        "",
        f"`python benchmarks/serve.py --requests {args.requests} --clients {args.clients}` on "
        f"{machine()}: MLP 3x512, one 1x512 row per request (safetensors), {args.clients} "
        "client threads in the benchmark process; Ray cluster num_cpus=2 on the same cores.",
        "",
        "| how | batching | requests/s | p50 | p99 | batch sizes seen (size: calls) |",
        "|---|---|---|---|---|---|",
    ]
    for how, batching, r in rows:
        lines.append(
            f"| {how} | {batching} | {r['rps']:.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms "
            f"| {sizes(r.get('batch_sizes_seen'))} |"
        )
    write(
        "serve",
        {"date": date, "machine": machine(), "args": vars(args), "rows": rows},
        lines,
    )


if __name__ == "__main__":
    main()

"""`nativert inspect` and `nativert bench`: what a saved package holds, and how fast it runs."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from nativert.cli.errors import CliError


def _describe(value: Any, ranges: dict) -> dict:
    if isinstance(value, torch.Tensor):
        shape = []
        for dim in value.shape:
            if isinstance(dim, torch.SymInt):
                r = ranges.get(dim.node.expr)
                bound = f"[{r.lower}, {r.upper}]" if r is not None else ""
                shape.append(f"{dim.node.expr}{bound}")
            else:
                shape.append(int(dim))
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": shape}
    return {"type": type(value).__name__}


def inspect(args: argparse.Namespace) -> int:
    import json
    import os

    import nativert
    from nativert.backend.package import read_manifest

    manifest = read_manifest(args.package)
    program = nativert.load(args.package, trust_native_code=args.trust_native_code)
    report = nativert.delegation_report(program)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = dict(program.range_constraints)
    inputs = [
        {"name": name, **_describe(placeholders[name].meta.get("val"), ranges)}
        for name in program.graph_signature.user_inputs
    ]
    outputs_node = program.graph.output_node().args[0]
    user_outputs = set(program.graph_signature.user_outputs)
    outputs = [
        {"name": n.name, **_describe(n.meta.get("val"), ranges)}
        for n in outputs_node
        if getattr(n, "name", None) in user_outputs
    ]
    delegates = [
        {
            "name": entry["module_name"],
            "backend_id": entry["backend_id"],
            "delegate_version": entry.get("delegate_version"),
            "toolchain": entry.get("toolchain", {}),
            "payload_bytes": len(lowered.processed_bytes),
            "compile_specs": dict(entry.get("compile_specs", [])),
        }
        for entry, lowered in zip(
            manifest["delegates"], nativert.lowered_modules(program), strict=True
        )
    ]
    info = {
        "file": args.package,
        "file_bytes": os.path.getsize(args.package),
        "torch_version": manifest.get("torch_version"),
        "format_version": manifest.get("format_version"),
        "inputs": inputs,
        "outputs": outputs,
        "delegates": delegates,
        "report": report.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{args.package}: {info['file_bytes'] / 1e6:.2f} MB, saved with torch "
        f"{info['torch_version']}, nativert package format {info['format_version']}"
    )
    for kind, items in (("input", inputs), ("output", outputs)):
        for item in items:
            print(
                f"  {kind} {item['name']}: {item.get('dtype', item.get('type'))} "
                f"{item.get('shape', '')}"
            )
    for d in delegates:
        tools = ", ".join(f"{k} {v}" for k, v in d["toolchain"].items())
        print(
            f"  delegate {d['name']}: {d['backend_id']} v{d['delegate_version']}"
            f"{f' ({tools})' if tools else ''}, payload {d['payload_bytes'] / 1e3:.1f} kB"
        )
    print(report)
    return 0


def _random_inputs(program, size: int) -> list[torch.Tensor]:
    """Inputs for every user input: dynamic dims at `size` (within their range)."""
    from nativert._program import finite_int

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = dict(program.range_constraints)
    inputs = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise CliError(f"input {name!r} is not a tensor; bench feeds tensors only")
        shape = []
        for dim in value.shape:
            if isinstance(dim, torch.SymInt):
                r = ranges.get(dim.node.expr)
                low = (finite_int(r.lower) if r is not None else None) or 1
                high = (finite_int(r.upper) if r is not None else None) or size
                shape.append(min(max(size, low), high))
            else:
                shape.append(int(dim))
        if value.dtype.is_floating_point:
            inputs.append(torch.randn(shape, dtype=value.dtype))
        elif value.dtype == torch.bool:
            inputs.append(torch.rand(shape) > 0.5)
        else:
            inputs.append(torch.randint(0, 2, shape, dtype=value.dtype))
    return inputs


def bench(args: argparse.Namespace) -> int:
    import threading

    import nativert

    program = nativert.load(args.package, trust_native_code=args.trust_native_code)
    executor = nativert.Executor(program)
    inputs = _random_inputs(program, args.size)
    samples: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = []
        with torch.no_grad():
            for _ in range(args.warmup):
                executor(*inputs)
            for _ in range(args.runs):
                start = time.perf_counter()
                executor(*inputs)
                mine.append(time.perf_counter() - start)
        with lock:
            samples.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] * 1e6

    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    print(
        f"{args.package}: Executor, inputs {shapes}, {args.threads} thread(s) x "
        f"{args.runs} runs (+{args.warmup} warm-up)"
    )
    print(
        f"  latency us: p50 {pct(50):.1f}  p90 {pct(90):.1f}  p99 {pct(99):.1f}  "
        f"min {samples[0] * 1e6:.1f}"
    )
    total = args.threads * (args.runs + args.warmup)
    print(f"  throughput: {total / wall:.0f} calls/s")
    if args.profile:
        print(executor.profile(*inputs))
    return 0

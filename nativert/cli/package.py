"""`nativert inspect` and `nativert bench`: what a saved package holds, and how fast it runs."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from nativert.cli.errors import CliError


def _dim(expr: Any, names: dict[str, str]) -> str:
    """A symbolic size with the user's Dim names: `batch`, `2*batch`, or torch's `s77` for
    a dim nobody named."""
    import sympy

    symbols = {s: sympy.Symbol(names[str(s)]) for s in expr.free_symbols if str(s) in names}
    return str(expr.xreplace(symbols))


def _describe(value: Any, names: dict[str, str]) -> dict:
    if isinstance(value, torch.Tensor):
        shape = [
            _dim(d.node.expr, names) if isinstance(d, torch.SymInt) else int(d) for d in value.shape
        ]
        return {"dtype": str(value.dtype).removeprefix("torch."), "shape": shape}
    return {"type": type(value).__name__}


def _dims(program, names: dict[str, str]) -> dict[str, dict]:
    """{dim: {"min": int, "max": int or None (unbounded)}} for every dynamic dim."""
    from nativert._program import finite_int

    return {
        names.get(str(symbol), str(symbol)): {
            "min": finite_int(r.lower),
            "max": finite_int(r.upper),
        }
        for symbol, r in program.range_constraints.items()
    }


def _shape_text(item: dict) -> str:
    if "shape" not in item:
        return item["type"]
    return f"{item['dtype']} [{', '.join(str(d) for d in item['shape'])}]"


def inspect(args: argparse.Namespace) -> int:
    import json
    import os

    import nativert
    from nativert._program.inputs import user_inputs
    from nativert.backend.package import read_manifest
    from nativert.backend.package.load import read_call_specs
    from nativert.backend.package.treespecs import STANDARD_CONTAINERS, leaf_paths, spec_type

    manifest = read_manifest(args.package)
    # inspect needs no output type: plain containers load whatever was registered at save
    program = nativert.load(
        args.package, trust_native_code=args.trust_native_code, plain_containers=True
    )
    saved_out_spec = read_call_specs(args.package)["out_spec"]
    report = nativert.delegation_report(program)
    names = manifest.get("dim_names", {})
    # The names a caller uses (the serving API's too), not the placeholders': `input`, which
    # the graph calls `input_1`.
    inputs = [{"name": name, **_describe(value, names)} for name, value in user_inputs(program)]
    user_outputs = set(program.graph_signature.user_outputs)
    output_nodes = [
        n for n in program.graph.output_node().args[0] if getattr(n, "name", None) in user_outputs
    ]
    paths = leaf_paths(saved_out_spec)
    if paths is None or len(paths) != len(output_nodes):
        paths = [n.name for n in output_nodes]
    outputs = [
        {"name": path, **_describe(n.meta.get("val"), names)}
        for path, n in zip(paths, output_nodes, strict=True)
    ]
    stored = {**program.state_dict, **program.constants}
    delegates = [
        {
            "name": entry["module_name"],
            "backend_id": entry["backend_id"],
            "delegate_version": entry.get("delegate_version"),
            "toolchain": entry.get("toolchain", {}),
            "payload_bytes": len(lowered.processed_bytes),
            "weight_bytes": _nbytes(stored[w["source"]] for w in entry["weights"]),
            "compile_specs": dict(entry.get("compile_specs", [])),
            "precision": lowered.precision,
            "accuracy": entry.get("accuracy"),
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
        "output_type": spec_type(saved_out_spec),
        "dims": _dims(program, names),
        "weight_bytes": _nbytes(stored.values()),
        "delegates": delegates,
        "report": report.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{args.package}: {info['file_bytes'] / 1e6:.2f} MB ({info['weight_bytes'] / 1e6:.2f} "
        f"MB of weights), saved with torch {info['torch_version']}, nativert package format "
        f"{info['format_version']}"
    )
    for item in inputs:
        print(f"  input {item['name']}: {_shape_text(item)}")
    if info["dims"]:
        ranges = ", ".join(
            f"{name}[{r['min']}, {'inf' if r['max'] is None else r['max']}]"
            for name, r in info["dims"].items()
        )
        print(f"  dims: {ranges}")
    if info["output_type"] not in (None, *STANDARD_CONTAINERS):
        print(f"  outputs: {info['output_type']}")
    for item in outputs:
        print(f"  output {item['name']}: {_shape_text(item)}")
    for d in delegates:
        tools = ", ".join(f"{k} {v}" for k, v in d["toolchain"].items())
        print(
            f"  delegate {d['name']}: {d['backend_id']} v{d['delegate_version']}"
            f"{f' ({tools})' if tools else ''}, payload {d['payload_bytes'] / 1e3:.1f} kB, "
            f"weights {d['weight_bytes'] / 1e6:.2f} MB, {d['precision']}"
        )
    print(report)
    return 0


def _nbytes(tensors: Any) -> int:
    """Bytes of distinct storages (tied weights count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _random_inputs(program, size: int) -> list[torch.Tensor]:
    """Inputs for every user input: dynamic dims at `size` (within their range)."""
    from nativert._program import finite_int
    from nativert._program.inputs import user_inputs

    ranges = dict(program.range_constraints)
    inputs = []
    for name, value in user_inputs(program):
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


_DIGITS = {"us": 1, "ms": 2, "s": 3}


def latency_unit(seconds: float) -> tuple[str, float]:
    """The unit for a latency line, chosen by its median: us below 1 ms, ms below 1 s, s
    above; and the factor from seconds."""
    if seconds < 1e-3:
        return "us", 1e6
    if seconds < 1:
        return "ms", 1e3
    return "s", 1.0


def bench(args: argparse.Namespace) -> int:
    import threading

    import nativert
    from nativert.backend.runtime.memory import process_memory

    rss_before = process_memory()["rss"]
    start = time.perf_counter()
    # bench feeds tensors and times calls: it needs no output type (plain containers)
    program = nativert.load(
        args.package, trust_native_code=args.trust_native_code, plain_containers=True
    )
    executor = nativert.Executor(program)
    load_s = time.perf_counter() - start
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
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))]

    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    precisions = sorted({m.precision for m in nativert.lowered_modules(program)}) or ["fp32"]
    print(
        f"{args.package}: Executor, precision {'+'.join(precisions)}, inputs {shapes}, "
        f"{args.threads} thread(s) x {args.runs} runs (+{args.warmup} warm-up)"
    )
    unit, scale = latency_unit(pct(50))
    values = [("p50", pct(50)), ("p90", pct(90)), ("p99", pct(99)), ("min", samples[0])]
    print(
        f"  latency {unit}: "
        + "  ".join(f"{name} {v * scale:.{_DIGITS[unit]}f}" for name, v in values)
    )
    total = args.threads * (args.runs + args.warmup)
    print(f"  throughput: {total / wall:.0f} calls/s")
    memory = process_memory()
    rss, peak = memory["rss"], memory["peak"]
    print(
        f"  memory: RSS {rss:.0f} MiB ({rss - rss_before:+.0f} MiB for the model), peak "
        f"{peak:.0f} MiB; load + Executor {load_s:.2f} s"
    )
    if args.profile:
        print(executor.profile(*inputs))
    return 0

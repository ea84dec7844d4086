"""`nativert` command line: demo, lower, inspect, bench."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

DEMO_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _median_us(fn, args, runs: int = 50) -> float:
    with torch.no_grad():
        for _ in range(5):
            fn(*args)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def demo(args: argparse.Namespace) -> int:
    import nativert
    from nativert.models import BUILTIN_MODELS, build

    print(
        f"nativert {nativert.__version__} on torch {torch.__version__}; "
        f"delegates available: {', '.join(nativert.list_delegates(available_only=True))}"
    )
    failures = 0
    for name in BUILTIN_MODELS:
        model, inputs = build(name)
        program = torch.export.export(model, inputs)
        delegated = nativert.to_backend(program)
        print(f"\n[{name}]")
        print(nativert.delegation_report(delegated))
        runnable = nativert.Executor(delegated)
        with torch.no_grad():
            expected, got = model(*inputs), runnable(*inputs)
        err = (expected - got).abs().max().item()
        ok = expected.shape == got.shape and torch.allclose(got, expected, **DEMO_TOLERANCE)
        failures += not ok
        eager_us, nrt_us = _median_us(model, inputs), _median_us(runnable, inputs)
        print(
            f"  numerics vs eager: {'OK' if ok else 'MISMATCH'} (max abs error {err:.2e}, "
            f"atol {DEMO_TOLERANCE['atol']})"
        )
        print(
            f"  median latency: eager {eager_us:.0f} us, nativert Executor {nrt_us:.0f} us "
            f"(speed-up x{eager_us / nrt_us:.2f})"
        )
    print("\ndemo:", "all models match eager" if not failures else f"{failures} model(s) MISMATCH")
    return 1 if failures else 0


class CliError(Exception):
    """A user error: printed as one line, without a traceback."""


def _load_factory(spec: str):
    """FILE.py:FACTORY -> the factory function (the file imported as a module)."""
    import importlib.util
    import os

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise CliError(f"{spec!r}: expected FILE.py:FACTORY, e.g. models.py:make_model")
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    module_name = f"nativert_user_{os.path.splitext(os.path.basename(path))[0]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise CliError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # its sibling imports
    try:
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise CliError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CliError(f"{path} has no function {name!r}")
    return factory


def _model_and_args(factory, spec: str):
    try:
        made = factory()
    except Exception as exc:
        raise CliError(f"{spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise CliError(
            f"{spec}: the factory must return (model, example_args), got {type(made).__name__}"
        )
    model, example = made
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, tuple):
        raise CliError(f"{spec}: example_args must be a tuple, got {type(example).__name__}")
    return model, example


def lower(args: argparse.Namespace) -> int:
    import os

    import nativert

    factory = _load_factory(args.factory)
    model, example = _model_and_args(factory, args.factory)
    dynamic = None
    if args.dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple(
            {0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in example
        )
    try:
        program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CliError(
            f"torch.export failed for {args.factory}: {type(exc).__name__}: {first}"
        ) from exc
    delegates = [d for d in args.delegates.split(",") if d] if args.delegates else None
    partitioner = nativert.CapabilityPartitioner(delegates, min_block_size=args.min_block_size)
    delegated = nativert.to_backend(program, partitioner, strict=args.strict, progress=True)
    print(nativert.delegation_report(delegated))
    nativert.save(delegated, args.output)
    print(f"saved {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB)")
    return 0


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
    program = nativert.load(args.package)
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

    program = nativert.load(args.package)
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativert", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="lower the built-in models and check them against eager")
    p = commands.add_parser("lower", help="export, lower and save a model from a factory")
    p.add_argument("factory", help="FILE.py:FACTORY; FACTORY() returns (model, example_args)")
    p.add_argument("-o", "--output", required=True, help="the .pt2 file to write")
    p.add_argument("--delegates", help="comma-separated backend ids in priority order")
    p.add_argument("--min-block-size", type=_positive, default=1)
    p.add_argument("--dynamic-batch", action="store_true", help="dim 0 of every input dynamic")
    p.add_argument("--strict", action="store_true", help="fail if a partition fails to compile")
    p = commands.add_parser("inspect", help="what a saved package holds")
    p.add_argument("package")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = commands.add_parser("bench", help="latency and throughput of a package's Executor")
    p.add_argument("package")
    p.add_argument("--threads", type=_positive, default=1)
    p.add_argument("--runs", type=_positive, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--size", type=_positive, default=4, help="size of dynamic dims")
    p.add_argument("--profile", action="store_true", help="also the per-node profile")
    args = parser.parse_args(argv)
    # torch 2.13's own run_decompositions deep-copies pytree specs through a deprecated
    # LeafSpec check and warns on every export; it says nothing about the user's model.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    run = {"demo": demo, "lower": lower, "inspect": inspect, "bench": bench}[args.command]
    try:
        return run(args)
    except BrokenPipeError:  # `nativert inspect x.pt2 --json | head`: the reader left
        sys.stderr.close()
        return 0
    except Exception as exc:
        if args.debug:
            raise
        what = str(exc) if isinstance(exc, CliError) else f"{type(exc).__name__}: {exc}"
        lines = what.strip().splitlines() or [type(exc).__name__]
        print(f"nativert {args.command}: error: {lines[0]}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

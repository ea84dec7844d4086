"""torch.compile(backend="nativert"): latency against eager, inductor and plain ONNX Runtime,
and compile time with an empty vs a warm payload cache.

    python benchmarks/compile_backend.py [--runs 200] [--rounds 7]

1. Latency (inference, no grad) of the built-in MLP, conv net and transformer block, batch 4,
   in interleaved rounds: eager; torch.compile(inductor); torch.compile(backend="nativert");
   nativert.Executor(to_backend(export)); plain ONNX Runtime (the whole model exported with
   torch.onnx, run with IOBinding, fresh output per call). Medians, and ratios to eager.
2. Compile time in fresh processes: each model compiled with an empty cache directory,
   then again in a new process with that directory warm. Time from torch.compile to the
   first result (Dynamo, aot_autograd, nativert and the first run), and nativert's own part.
Writes benchmarks/results/compile_backend.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from _harness import interleaved_medians, machine, plain_ort_runner, write

import nativert
from nativert.models import build

MODELS = ("mlp", "convnet", "transformer")


def latency(args) -> dict:
    results = {}
    for name in MODELS:
        model, inputs = build(name)
        torch._dynamo.reset()
        with torch.no_grad():
            expected = model(*inputs)
            start = time.perf_counter()
            inductor = torch.compile(model)
            inductor(*inputs)
            inductor_compile = time.perf_counter() - start
            start = time.perf_counter()
            ours = torch.compile(model, backend="nativert", options={"cache_dir": None})
            ours(*inputs)
            nativert_compile = time.perf_counter() - start
            executor = nativert.Executor(nativert.to_backend(torch.export.export(model, inputs)))
            ort_run = plain_ort_runner(model, inputs, expected)
            cases = {
                "eager": lambda m=model, i=inputs: m(*i),
                "inductor": lambda f=inductor, i=inputs: f(*i),
                "nativert_compile": lambda f=ours, i=inputs: f(*i),
                "nativert_executor": lambda f=executor, i=inputs: f(*i),
                "plain_ort": ort_run,
            }
            errors = {case: float((fn() - expected).abs().max()) for case, fn in cases.items()}
        medians = interleaved_medians(cases, runs=args.runs, rounds=args.rounds, warmup=50)
        results[name] = {
            "median_us": {k: round(v, 1) for k, v in medians.items()},
            "speedup_vs_eager": {k: round(medians["eager"] / v, 2) for k, v in medians.items()},
            "max_abs_error": errors,
            "compile_s": {
                "inductor": round(inductor_compile, 2),
                "nativert_compile": round(nativert_compile, 2),
            },
        }
        print(name, results[name]["median_us"], flush=True)
    return results


_COMPILE_ONCE = textwrap.dedent(
    """
    import json, sys, time, torch
    from nativert.models import build
    model, inputs = build(sys.argv[1])
    training = sys.argv[3] == "train"
    if training:
        model.train()
    start = time.perf_counter()
    compiled = torch.compile(model, backend="nativert", options={"cache_dir": sys.argv[2]})
    if training:
        compiled(*inputs).sum().backward()
    else:
        with torch.no_grad():
            compiled(*inputs)
    seconds = time.perf_counter() - start
    import nativert
    report = nativert.last_compile_report()
    print(json.dumps({"seconds": seconds, "nativert_seconds": report.seconds,
                      "hits": report.cache_hits, "misses": report.cache_misses}))
    """
)


def compile_once(name: str, cache_dir: str, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_ONCE, name, cache_dir, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def cache_times() -> dict:
    results = {}
    for name in MODELS:
        for mode in ("infer", "train"):
            with tempfile.TemporaryDirectory() as cache_dir:
                first = compile_once(name, cache_dir, mode)
                second = compile_once(name, cache_dir, mode)
            results[f"{name} ({mode})"] = {
                "first_s": round(first["seconds"], 2),
                "cached_s": round(second["seconds"], 2),
                "ratio": round(second["seconds"] / first["seconds"], 2),
                "nativert_first_s": round(first["nativert_seconds"], 2),
                "nativert_cached_s": round(second["nativert_seconds"], 2),
                "cache_hits": second["hits"],
                "cache_misses_when_warm": second["misses"],
            }
            print(name, mode, results[f"{name} ({mode})"], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    lat = latency(args)
    cache = cache_times()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": (
            f"python benchmarks/compile_backend.py --runs {args.runs} --rounds {args.rounds}"
        ),
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "latency": lat,
        "compile_cache": cache,
    }
    cases = list(next(iter(lat.values()))["median_us"])
    lines = [
        f'# torch.compile(backend="nativert") ({result["date"]})',
        "",
        f"`{result['command']}` on {result['machine']}; torch {result['torch']}, "
        f"onnxruntime {result['onnxruntime']}. Inference, batch 4; median of {args.rounds} "
        f"interleaved rounds of {args.runs} calls; (x N) = speed-up over eager.",
        "",
        "| model | " + " | ".join(cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for name, r in lat.items():
        cells = [f"{r['median_us'][c]:.0f} us (x{r['speedup_vs_eager'][c]:.2f})" for c in cases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Compile time in fresh processes, empty cache vs warm cache (torch.compile to first "
        "result; `nativert` = time in nativert's own compilers, the rest is Dynamo and "
        "aot_autograd):",
        "",
        "| model | first | cached | cached/first | nativert first | nativert cached |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in cache.items():
        lines.append(
            f"| {name} | {r['first_s']:.2f} s | {r['cached_s']:.2f} s | {r['ratio']:.0%} | "
            f"{r['nativert_first_s']:.2f} s | {r['nativert_cached_s']:.2f} s |"
        )
    write("compile_backend", result, lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()

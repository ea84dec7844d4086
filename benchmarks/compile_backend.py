"""torch.compile(backend="nativert") against the Executor on the same model, inductor and eager,
and what Dynamo alone costs; then compile time with an empty vs a warm payload cache.

    python benchmarks/compile_backend.py [--runs 50] [--rounds 15] [--models mlp,bert,...]
                                         [--baseline old_backend.py] [--no-cache-times]

1. Latency (inference, no grad) of the suite's models (benchmarks/models.py), in interleaved
   rounds (a pause between cases; the machine is shared, so compare within a round):
     eager              the PyTorch model
     inductor           torch.compile(model)
     nativert_compile   torch.compile(model, backend="nativert"), payload cache off
     nativert_executor  nativert.Executor(nativert.to_backend(torch.export.export(model)))
     dynamo_floor       torch.compile(model, backend=<returns a stored output>): what Dynamo's
                        frame and guards cost any backend per call (compile - executor is
                        about this)
     baseline           (--baseline FILE: a Python file whose `nativert_backend` is another
                        version of the backend, e.g. an older commit's, for before/after)
     nativert_compile_autotune, nativert_autotune
                        (--autotune) torch.compile and the Executor with autotune=True; their
                        ratio says whether torch.compile gets what the Executor's autotune gets
   Per model: medians, and medians over rounds of compile/executor and compile/inductor.
   "lstm (allow_rnn)" traces the LSTM (Dynamo skips RNN modules by default, so compiled
   runs it in eager).
2. Compile time in fresh processes for the built-in mlp, convnet and transformer: compiled
   with an empty cache directory, then again in a new process with that directory warm.
Writes benchmarks/results/compile_backend.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from _harness import machine, time_us, write

import nativert

sys.path.insert(0, str(Path(__file__).parent))
from models import SUITE, make  # noqa: E402

CACHE_MODELS = ("mlp", "convnet", "transformer")
RNN = "lstm (allow_rnn)"


def _floor_backend(gm, example_inputs):
    """A Dynamo backend whose graph returns the outputs of its first run: what remains is
    Dynamo's own per-call cost."""
    outputs = gm(*example_inputs)
    return lambda *args: outputs


def _load_baseline(path: str):
    sys.path.insert(0, str(Path(path).resolve().parent))  # its own imports
    spec = importlib.util.spec_from_file_location("nativert_baseline_backend", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = module.nativert_backend
    return lambda gm, example_inputs: backend(gm, example_inputs, options={"cache_dir": None})


def dynamo_config(name: str):
    """Dynamo's settings for the model, while compiling and running: a change recompiles."""
    return torch._dynamo.config.patch(allow_rnn=True) if name == RNN else contextlib.nullcontext()


def build_cases(name: str, baseline, autotune: bool = False) -> tuple[dict, dict, dict]:
    model, inputs = make("lstm" if name == RNN else name)
    with torch.no_grad():
        expected = model(*inputs)
    compiled = {
        "inductor": lambda: torch.compile(model),
        "nativert_compile": lambda: torch.compile(
            model, backend="nativert", options={"cache_dir": None}
        ),
        "dynamo_floor": lambda: torch.compile(model, backend=_floor_backend),
    }
    if baseline is not None:
        compiled["baseline"] = lambda: torch.compile(model, backend=baseline)
    if autotune:
        compiled["nativert_compile_autotune"] = lambda: torch.compile(
            model, backend="nativert", options={"cache_dir": None, "autotune": True}
        )
    cases = {"eager": lambda: model(*inputs)}
    seconds, errors = {}, {}
    for case, make_fn in compiled.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        with torch.no_grad():
            fn = make_fn()
            out = fn(*inputs)
        seconds[case] = round(time.perf_counter() - start, 2)
        errors[case] = float((out - expected).abs().max())
        cases[case] = lambda f=fn: f(*inputs)
    start = time.perf_counter()
    with torch.no_grad():
        executor = nativert.Executor(
            nativert.to_backend(torch.export.export(model, inputs), cache_dir=None)
        )
        errors["nativert_executor"] = float((executor(*inputs) - expected).abs().max())
    seconds["nativert_executor"] = round(time.perf_counter() - start, 2)
    cases["nativert_executor"] = lambda: executor(*inputs)
    if autotune:
        start = time.perf_counter()
        with torch.no_grad():
            tuned = nativert.Executor(
                nativert.to_backend(
                    torch.export.export(model, inputs), cache_dir=None, autotune=True
                )
            )
            errors["nativert_autotune"] = float((tuned(*inputs) - expected).abs().max())
        seconds["nativert_autotune"] = round(time.perf_counter() - start, 2)
        cases["nativert_autotune"] = lambda: tuned(*inputs)
    errors.pop("dynamo_floor")
    return cases, seconds, errors


def rounds(cases: dict, *, runs: int, rounds: int, settle_s: float = 0.05) -> dict:
    """us per call for each case and round, the cases of a round back to back."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for fn in cases.values():
            time_us(fn, 10)
        for _ in range(rounds):
            for name, fn in cases.items():
                time.sleep(settle_s)  # ORT's and OpenMP's spinning threads settle
                fn()
                samples[name].append(time_us(fn, runs))
    return samples


def _ratio(samples: dict, a: str, b: str) -> dict | None:
    """a / b: the median over rounds of the ratio within a round, and the ratio of the
    fastest rounds (on a shared machine the least disturbed)."""
    if a not in samples or b not in samples:
        return None
    per_round = statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))
    return {"median": round(per_round, 3), "min": round(min(samples[a]) / min(samples[b]), 3)}


def latency(args) -> dict:
    baseline = _load_baseline(args.baseline) if args.baseline else None
    results = {}
    for name in args.models:
        with dynamo_config(name):
            cases, seconds, errors = build_cases(name, baseline, args.autotune)
            samples = rounds(cases, runs=args.runs, rounds=args.rounds)
        medians = {k: round(statistics.median(v), 1) for k, v in samples.items()}
        results[name] = {
            "median_us": medians,
            "min_us": {k: round(min(v), 1) for k, v in samples.items()},
            "speedup_vs_eager": {k: round(medians["eager"] / v, 2) for k, v in medians.items()},
            "compile_over_executor": _ratio(samples, "nativert_compile", "nativert_executor"),
            "compile_over_inductor": _ratio(samples, "nativert_compile", "inductor"),
            "executor_over_inductor": _ratio(samples, "nativert_executor", "inductor"),
            "baseline_over_executor": _ratio(samples, "baseline", "nativert_executor"),
            "compile_autotune_over_autotune": _ratio(
                samples, "nativert_compile_autotune", "nativert_autotune"
            ),
            "compile_s": seconds,
            "max_abs_error": errors,
        }
        print(name, medians, {k: v for k, v in results[name].items() if "over" in k}, flush=True)
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
    for name in CACHE_MODELS:
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


def _us(us: float) -> str:
    return f"{us:.0f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def _latency_lines(lat: dict, with_baseline: bool) -> list[str]:
    cases = list(next(iter(lat.values()))["median_us"])
    ratios = ["compile_over_executor", "compile_over_inductor", "executor_over_inductor"]
    if with_baseline:
        ratios.append("baseline_over_executor")
    if any(r.get("compile_autotune_over_autotune") for r in lat.values()):
        ratios.append("compile_autotune_over_autotune")
    lines = [
        "| model | " + " | ".join(cases) + " | " + " | ".join(ratios) + " |",
        "|---|" + "---|" * (len(cases) + len(ratios)),
    ]
    for name, r in lat.items():
        cells = [f"{_us(r['median_us'][c])} (x{r['speedup_vs_eager'][c]:.2f})" for c in cases]
        cells += [f"{r[k]['median']:.2f} ({r[k]['min']:.2f})" for k in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render(result: dict) -> list[str]:
    """The markdown report of a result (what main() writes next to the JSON)."""
    lines = [
        f'# torch.compile(backend="nativert") ({result["date"]})',
        "",
        f"`{result['command']}` on {result['machine']}; torch {result['torch']}, onnxruntime "
        f"{result['onnxruntime']}. Inference; median over {result['rounds']} interleaved rounds "
        f"of {result['runs']} calls; (x N) = speed-up over eager; a_over_b = median over "
        "rounds of latency a / latency b within the round (in brackets: fastest round of a / "
        "fastest round of b); < 1: a is faster. dynamo_floor: torch.compile with a backend "
        "that returns a stored output, i.e. what Dynamo's frame and guards cost per call with "
        "warm caches (between real runs the caches are cold and it costs 2-4x that).",
    ]
    if result.get("baseline"):
        lines += ["", f"baseline: {result['baseline']}"]
    lines += ["", *_latency_lines(result["latency"], bool(result.get("baseline")))]
    cache = result["compile_cache"]
    if cache:
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
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default=",".join([*SUITE, RNN]))
    parser.add_argument("--baseline", default=None, help="a file defining nativert_backend")
    parser.add_argument("--baseline-label", default=None, help="what that file is")
    parser.add_argument("--no-cache-times", action="store_true")
    parser.add_argument(
        "--autotune",
        action="store_true",
        help="add torch.compile and the Executor with autotune=True (slow: AOTI compiles)",
    )
    parser.add_argument("--name", default="compile_backend", help="results file name")
    args = parser.parse_args()
    args.models = args.models.split(",")
    lat = latency(args)
    cache = {} if args.no_cache_times else cache_times()
    command = f"python benchmarks/compile_backend.py --runs {args.runs} --rounds {args.rounds}"
    if args.models != [*SUITE, RNN]:
        command += f" --models {','.join(args.models)}"
    if args.baseline:
        command += f" --baseline {args.baseline}"
    if args.no_cache_times:
        command += " --no-cache-times"
    if args.autotune:
        command += f" --autotune --name {args.name}"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "runs": args.runs,
        "rounds": args.rounds,
        "baseline": args.baseline
        and (args.baseline_label or f"`nativert_backend` of {args.baseline}"),
        "latency": lat,
        "compile_cache": cache,
    }
    write(args.name, result, render(result))


if __name__ == "__main__":
    main()

"""The benchmark suite: nine models, the ways a user could run each, one interleaved run per
model.

    python benchmarks/suite.py [--runs 20] [--rounds 7] [--models mlp,bert,...]

Ways to run (each compiled from the same model and inputs; inference, no grad):
  eager              the PyTorch model
  inductor           torch.compile(model) (Inductor, default settings)
  plain_ort          the whole model through torch.onnx.export, one ONNX Runtime session
                     called with IOBinding (fresh output per call)
  aoti               the whole model through AOTInductor (aoti_compile_and_package)
  openvino           openvino.convert_model(exported program), compiled for CPU with f32
                     precision and the latency hint, called through one InferRequest
  openvino_compile   torch.compile(model, backend="openvino")
  nativert_compile   torch.compile(model, backend="nativert"), payload cache off
  nativert_executor  nativert.Executor(nativert.to_backend(torch.export.export(...))),
                     payload cache off
  nativert_autotune  the same with autotune=True, from an empty cache (the compile time
                     includes the tuning)
Lower precision (each column's error against fp32 eager is reported beside it):
  openvino_default   as openvino, at OpenVINO's default precision (bf16 on CPUs with
                     AVX512-BF16 or AMX, f32 elsewhere)
  inductor_bf16      torch.compile(model) called under torch.autocast("cpu", torch.bfloat16)
  aoti_bf16          AOTInductor of the model in bf16 (float inputs cast in, outputs out)
  nativert_bf16      nativert.Executor(nativert.to_backend(ep, precision="bf16"))
  nativert_bf16_autotune  the same with autotune=True
Per model and way: compile time, median and min latency (over rounds of `runs` calls),
speed-up over eager, max abs error against eager, or the failure. Writes
benchmarks/results/suite.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from _harness import interleaved_stats, machine, plain_ort_runner, write

import nativert

sys.path.insert(0, str(Path(__file__).parent))
from models import SUITE, make  # noqa: E402


def aoti(model, inputs, expected):
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = torch._inductor.aoti_compile_and_package(
            torch.export.export(model, inputs), package_path=f"{directory}/model.pt2"
        )
        compiled = torch._inductor.aoti_load_package(path)
    return lambda: compiled(*inputs)


def inductor(model, inputs, expected):
    compiled = torch.compile(model)
    compiled(*inputs)
    return lambda: compiled(*inputs)


def openvino(model, inputs, expected, precision_hint="f32"):
    """OpenVINO as its users run it; precision_hint None: its default precision."""
    import openvino as ov

    converted = ov.convert_model(torch.export.export(model, inputs))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if precision_hint is not None:
        config["INFERENCE_PRECISION_HINT"] = precision_hint
    request = ov.Core().compile_model(converted, "CPU", config).create_infer_request()

    def run():
        outputs = request.infer([x.numpy() for x in inputs], share_inputs=True)
        return torch.from_numpy(outputs[0])

    return run


def openvino_compile(model, inputs, expected):
    import openvino.torch  # noqa: F401  (registers the backend)

    compiled = torch.compile(model, backend="openvino")
    compiled(*inputs)
    return lambda: compiled(*inputs)


def nativert_compile(model, inputs, expected):
    compiled = torch.compile(model, backend="nativert", options={"cache_dir": None})
    compiled(*inputs)
    return lambda: compiled(*inputs)


def nativert_executor(model, inputs, expected):
    program = nativert.to_backend(torch.export.export(model, inputs), cache_dir=None)
    executor = nativert.Executor(program)
    return lambda: executor(*inputs)


def nativert_autotune(model, inputs, expected):
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        program = nativert.to_backend(
            torch.export.export(model, inputs), autotune=True, cache_dir=cache
        )
    executor = nativert.Executor(program)
    print(nativert.delegation_report(program), flush=True)
    return lambda: executor(*inputs)


def openvino_default(model, inputs, expected):
    return openvino(model, inputs, expected, precision_hint=None)


def inductor_bf16(model, inputs, expected):
    compiled = torch.compile(model)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(*inputs).float()

    run()
    return run


def _bf16(x):
    return x.bfloat16() if x.dtype.is_floating_point else x


def aoti_bf16(model, inputs, expected):
    import copy
    import tempfile

    low = copy.deepcopy(model).bfloat16()
    cast = tuple(_bf16(x) for x in inputs)
    with tempfile.TemporaryDirectory() as directory:
        path = torch._inductor.aoti_compile_and_package(
            torch.export.export(low, cast), package_path=f"{directory}/model.pt2"
        )
        compiled = torch._inductor.aoti_load_package(path)
    return lambda: compiled(*(_bf16(x) for x in inputs)).float()


def nativert_bf16(model, inputs, expected, autotune=False):
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        program = nativert.to_backend(
            torch.export.export(model, inputs),
            precision="bf16",
            autotune=autotune,
            cache_dir=cache,
        )
    executor = nativert.Executor(program)
    print(nativert.delegation_report(program), flush=True)
    return lambda: executor(*inputs)


def nativert_bf16_autotune(model, inputs, expected):
    return nativert_bf16(model, inputs, expected, autotune=True)


WAYS = {
    "inductor": inductor,
    "plain_ort": plain_ort_runner,
    "aoti": aoti,
    "openvino": openvino,
    "openvino_compile": openvino_compile,
    "nativert_compile": nativert_compile,
    "nativert_executor": nativert_executor,
    "nativert_autotune": nativert_autotune,
    "openvino_default": openvino_default,
    "inductor_bf16": inductor_bf16,
    "aoti_bf16": aoti_bf16,
    "nativert_bf16": nativert_bf16,
    "nativert_bf16_autotune": nativert_bf16_autotune,
}
PEERS = ("eager", "inductor", "plain_ort", "aoti", "openvino", "openvino_compile")
BF16_PEERS = ("openvino_default", "inductor_bf16", "aoti_bf16")
FP32_WAYS = tuple(
    w for w in WAYS if w not in (*BF16_PEERS, "nativert_bf16", "nativert_bf16_autotune")
)


def _failure(exc: BaseException) -> str:
    """The exception and its root cause, one line each, without terminal colors."""
    import re

    def line(e: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"

    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    return line(exc) if root is exc else f"{line(exc)} (cause: {line(root)})"


def bench_model(name: str, args) -> dict:
    model, inputs = make(name)
    with torch.no_grad():
        expected = model(*inputs)
    cases = {"eager": lambda: model(*inputs)}
    result: dict = {"compile_s": {}, "failures": {}, "max_abs_error": {}, "rel_error": {}}
    for way, build in WAYS.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                fn = build(model, inputs, expected)
                got = fn()
        except Exception as exc:  # recorded, not hidden: the table shows it
            result["failures"][way] = _failure(exc)
            print(f"  {name} {way}: FAILED {result['failures'][way]}", flush=True)
            continue
        result["compile_s"][way] = round(time.perf_counter() - start, 2)
        result["max_abs_error"][way] = float((got - expected).abs().max())
        result["rel_error"][way] = result["max_abs_error"][way] / float(expected.abs().max())
        cases[way] = fn
    stats = interleaved_stats(cases, runs=args.runs, rounds=args.rounds)
    eager = stats["eager"]["median_us"]
    result["median_us"] = {k: round(v["median_us"], 1) for k, v in stats.items()}
    result["min_us"] = {k: round(v["min_us"], 1) for k, v in stats.items()}
    result["speedup_vs_eager"] = {k: round(eager / v["median_us"], 2) for k, v in stats.items()}
    print(name, result["median_us"], flush=True)
    return result


def _latency(us: float) -> str:
    return f"{us:.0f} us" if us < 1000 else f"{us / 1000:.2f} ms"


def _versus_peers(results: dict, peers_of=PEERS, ours=None, title=None) -> list[str]:
    """Per model: the best peer, and each nativert way as a ratio of it (>1: faster); then
    geomeans of the speed-ups over eager."""
    ours = ours or [w for w in FP32_WAYS if w.startswith("nativert")]
    lines = [
        title
        or "Against the best peer per model (ratio = peer latency / nativert latency; >= 1.00 "
        "means nativert is at least as fast):",
        "",
        "| model | best peer | " + " | ".join(ours) + " |",
        "|---|---|" + "---|" * len(ours),
    ]
    logs: dict[str, list[float]] = {w: [] for w in ["best_peer", *ours]}
    for name, r in results.items():
        medians = r["median_us"]
        peers = {w: medians[w] for w in peers_of if w in medians}
        if not peers:
            continue
        best = min(peers, key=peers.__getitem__)
        logs["best_peer"].append(math.log(r["speedup_vs_eager"][best]))
        cells = []
        for way in ours:
            if way in medians:
                cells.append(f"{peers[best] / medians[way]:.2f}")
                logs[way].append(math.log(r["speedup_vs_eager"][way]))
            else:
                cells.append("failed")
        lines.append(
            f"| {name} | {best} (x{r['speedup_vs_eager'][best]:.2f}) | " + " | ".join(cells) + " |"
        )
    geo = {w: math.exp(sum(v) / len(v)) for w, v in logs.items() if v}
    lines += [
        "",
        "Geomean speed-up over eager: "
        + ", ".join(f"{w} x{g:.2f}" for w, g in geo.items())
        + " (best_peer: the fastest peer of each model).",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default=",".join(SUITE))
    parser.add_argument(
        "--render", metavar="JSON", help="write the tables of an earlier run's json again"
    )
    args = parser.parse_args()
    if args.render:
        import json

        report = json.loads(Path(args.render).read_text())
        render(report)
        return
    warnings.filterwarnings("ignore")
    names = [m for m in args.models.split(",") if m]
    results = {name: bench_model(name, args) for name in names}
    command = f"python benchmarks/suite.py --runs {args.runs} --rounds {args.rounds}"
    if args.models != ",".join(SUITE):
        command += f" --models {args.models}"
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "openvino": __import__("openvino").__version__,
        "models": results,
    }
    render(report)


def render(report: dict) -> None:
    results, command = report["models"], report["command"]
    ways = ["eager", *WAYS]
    lines = [
        f"# nativert benchmark suite ({report['date']})",
        "",
        f"`{command}` on {report['machine']}; torch {report['torch']}, onnxruntime "
        f"{report['onnxruntime']}, openvino {report['openvino']}. Inference. Each cell: median "
        "latency (speed-up over eager); "
        "min latency, compile time and numerics are in suite.json.",
        "",
        "| model | " + " | ".join(ways) + " |",
        "|---|" + "---|" * len(ways),
    ]
    for name, r in results.items():
        cells = []
        for way in ways:
            if way in r["failures"]:
                cells.append("failed")
            else:
                cells.append(f"{_latency(r['median_us'][way])} (x{r['speedup_vs_eager'][way]:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *_versus_peers(results)]
    title = (
        "At precision='bf16', against the fastest lower-precision peer (peer latency / "
        "nativert latency); the relative error of each column against fp32 eager (max "
        "|error| / max |output|) is in the table after it:"
    )
    lines += [
        "",
        *_versus_peers(results, BF16_PEERS, ["nativert_bf16", "nativert_bf16_autotune"], title),
        "",
        "| model | "
        + " | ".join(
            f"{w} rel err" for w in (*BF16_PEERS, "nativert_bf16", "nativert_bf16_autotune")
        )
        + " |",
        "|---|" + "---|" * 5,
    ]
    for name, r in results.items():
        cells = [
            f"{r['rel_error'][w]:.1e}" if w in r["rel_error"] else "failed"
            for w in (*BF16_PEERS, "nativert_bf16", "nativert_bf16_autotune")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Compile time (s) and max abs error vs eager:", ""]
    lines += ["| model | " + " | ".join(WAYS) + " |", "|---|" + "---|" * len(WAYS)]
    for name, r in results.items():
        cells = [
            f"{r['compile_s'][w]:.1f} s, {r['max_abs_error'][w]:.1e}"
            if w in r["compile_s"]
            else "failed"
            for w in WAYS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    failures = [(n, w, f) for n, r in results.items() for w, f in r["failures"].items()]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {n} / {w}: {f}" for n, w, f in failures]
    write("suite", report, lines)


if __name__ == "__main__":
    main()

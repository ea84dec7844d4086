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
int8 (`--int8`; one PT2E program per model: nativert.quantize, X86InductorQuantizer, calibrated
on 8 batches, the example and 7 noisy copies of its float inputs):
  nativert_int8      nativert.Executor(nativert.to_backend(quantized program))
  nativert_int8_autotune  the same with autotune=True (onnxruntime, openvino, aoti, pytorch)
  nativert_int8_rr_autotune  autotune on the program quantized with
                     scheme="x86_reduce_range" (7-bit activations): what OpenVINO's and
                     oneDNN's int8 kernels need on CPUs without VNNI or AMX
  inductor_int8      torch.compile(quantized program.module()) with freezing=True (what
                     inductor's x86 int8 lowering needs)
  ort_dynamic        onnxruntime.quantization.quantize_dynamic of the fp32 ONNX model
                     (defaults: int8 weights, dynamic activations)
  ort_static         onnxruntime.quantization.quantize_static (QDQ, per-channel, defaults)
                     of the fp32 ONNX model on the same calibration batches
  openvino_nncf      nncf.quantize of the fp32 OpenVINO model on the same batches
                     (OpenVINO's int8 flow; needs nncf)
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


def _lowered_executor(program, inputs, **options):
    """nativert.Executor over `program` lowered with `options`, from an empty payload cache
    (so compile time includes tuning); prints the delegation report."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        lowered = nativert.to_backend(program, cache_dir=cache, **options)
    executor = nativert.Executor(lowered)
    print(nativert.delegation_report(lowered), flush=True)
    return lambda: executor(*inputs)


def nativert_autotune(model, inputs, expected):
    return _lowered_executor(torch.export.export(model, inputs), inputs, autotune=True)


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
    program = torch.export.export(model, inputs)
    return _lowered_executor(program, inputs, precision="bf16", autotune=autotune)


def nativert_bf16_autotune(model, inputs, expected):
    return nativert_bf16(model, inputs, expected, autotune=True)


_QUANTIZED: dict = {}


def _calibration(inputs, count=8):
    """The example inputs and noisy copies of their float tensors."""
    generator = torch.Generator().manual_seed(1)
    batches = [inputs]
    for _ in range(count - 1):
        batches.append(
            tuple(
                x + 0.1 * torch.randn(x.shape, generator=generator) if x.is_floating_point() else x
                for x in inputs
            )
        )
    return batches


def quantized_program(model, inputs, scheme="x86"):
    """The model's PT2E int8 program (made once per model and scheme)."""
    if _QUANTIZED.get("model") is not model:
        _QUANTIZED.clear()
        _QUANTIZED["model"] = model
    if scheme not in _QUANTIZED:
        _QUANTIZED[scheme] = nativert.quantize(model, _calibration(inputs), scheme=scheme)
    return _QUANTIZED[scheme]


def nativert_int8(model, inputs, expected, autotune=False, scheme="x86"):
    program = quantized_program(model, inputs, scheme)
    return _lowered_executor(program, inputs, autotune=autotune)


def nativert_int8_autotune(model, inputs, expected):
    return nativert_int8(model, inputs, expected, autotune=True)


def nativert_int8_rr_autotune(model, inputs, expected):
    return nativert_int8(model, inputs, expected, autotune=True, scheme="x86_reduce_range")


def inductor_int8(model, inputs, expected):
    import copy

    from torch._inductor import config

    # freezing changes the module's tensors in place: a copy, not the program others run
    compiled = torch.compile(copy.deepcopy(quantized_program(model, inputs).module()))
    # torch 2.13's oneDNN int8 lowering writes `x + qlinear(x)` into x (a "sum" post-op):
    # the transformer block's input changed on every call. Its own copy, not the suite's.
    own = tuple(x.clone() for x in inputs)
    with config.patch(freezing=True), torch.no_grad():
        compiled(*own)  # compiles, frozen
    return lambda: compiled(*own)


def _ort_quantized(model, inputs, expected, static):
    import tempfile

    from _harness import ort_session_runner, plain_onnx
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self, names):
            self.batches = iter(
                [
                    {n: x.numpy() for n, x in zip(names, b, strict=True)}
                    for b in _calibration(inputs)
                ]
            )

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as directory:
        fp32, int8 = f"{directory}/fp32.onnx", f"{directory}/int8.onnx"
        Path(fp32).write_bytes(plain_onnx(model, inputs))
        if static:
            import onnx

            names = [i.name for i in onnx.load(fp32, load_external_data=False).graph.input]
            q.quantize_static(
                fp32, int8, Reader(names), quant_format=q.QuantFormat.QDQ, per_channel=True
            )
        else:
            q.quantize_dynamic(fp32, int8)
        return ort_session_runner(Path(int8).read_bytes(), inputs, expected)


def ort_dynamic(model, inputs, expected):
    return _ort_quantized(model, inputs, expected, static=False)


def ort_static(model, inputs, expected):
    return _ort_quantized(model, inputs, expected, static=True)


def openvino_nncf(model, inputs, expected):
    import nncf
    import openvino as ov

    converted = ov.convert_model(torch.export.export(model, inputs))
    names = [p.get_any_name() for p in converted.inputs]
    dataset = nncf.Dataset(
        [{n: x.numpy() for n, x in zip(names, b, strict=True)} for b in _calibration(inputs)]
    )
    quantized = nncf.quantize(converted, dataset)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    request = ov.Core().compile_model(quantized, "CPU", config).create_infer_request()

    def run():
        outputs = request.infer([x.numpy() for x in inputs], share_inputs=True)
        return torch.from_numpy(outputs[0])

    return run


INT8_WAYS = {
    "inductor_int8": inductor_int8,
    "ort_dynamic": ort_dynamic,
    "ort_static": ort_static,
    "openvino_nncf": openvino_nncf,
    "nativert_int8": nativert_int8,
    "nativert_int8_autotune": nativert_int8_autotune,
    "nativert_int8_rr_autotune": nativert_int8_rr_autotune,
}
INT8_PEERS = ("inductor_int8", "ort_dynamic", "ort_static", "openvino_nncf")

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


def bench_model(name: str, args, ways: dict = WAYS) -> dict:
    model, inputs = make(name)
    with torch.no_grad():
        expected = model(*inputs)
    cases = {"eager": lambda: model(*inputs)}
    result: dict = {"compile_s": {}, "failures": {}, "max_abs_error": {}, "rel_error": {}}
    for way, build in ways.items():
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
        "--int8",
        action="store_true",
        help="the int8 ways (with eager, inductor, plain_ort and nativert_executor in fp32); "
        "writes results/suite_int8.{json,md}",
    )
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
    ways = WAYS
    if args.int8:
        fp32 = ("inductor", "plain_ort", "nativert_executor")
        ways = {**{w: WAYS[w] for w in fp32}, **INT8_WAYS}
    results = {name: bench_model(name, args, ways) for name in names}
    command = f"python benchmarks/suite.py --runs {args.runs} --rounds {args.rounds}"
    if args.models != ",".join(SUITE):
        command += f" --models {args.models}"
    if args.int8:
        command += " --int8"
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


def render_int8(report: dict) -> None:
    results, command = report["models"], report["command"]
    ways = ["eager", "inductor", "plain_ort", "nativert_executor", *INT8_WAYS]
    lines = [
        f"# nativert int8 benchmark ({report['date']})",
        "",
        f"`{command}` on {report['machine']}; torch {report['torch']}, onnxruntime "
        f"{report['onnxruntime']}, openvino {report['openvino']}. Inference. Each cell: median "
        "latency (speed-up over fp32 eager). eager, inductor, plain_ort and nativert_executor "
        "are fp32; the rest int8 (see the suite.py docstring).",
        "",
        "| model | " + " | ".join(ways) + " |",
        "|---|" + "---|" * len(ways),
    ]
    for name, r in results.items():
        cells = [
            "failed"
            if w in r["failures"]
            else f"{_latency(r['median_us'][w])} (x{r['speedup_vs_eager'][w]:.2f})"
            for w in ways
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    title = (
        "Against the fastest int8 peer (peer latency / nativert latency; >= 1.00: nativert "
        "is at least as fast):"
    )
    ours = ["nativert_int8", "nativert_int8_autotune", "nativert_int8_rr_autotune"]
    lines += ["", *_versus_peers(results, INT8_PEERS, ours, title)]
    errors = [w for w in ways if w != "eager"]
    lines += [
        "",
        "Relative error against fp32 eager (max |error| / max |output|):",
        "",
        "| model | " + " | ".join(errors) + " |",
        "|---|" + "---|" * len(errors),
    ]
    for name, r in results.items():
        cells = [f"{r['rel_error'][w]:.1e}" if w in r["rel_error"] else "failed" for w in errors]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Compile time (s):", ""]
    lines += ["| model | " + " | ".join(errors) + " |", "|---|" + "---|" * len(errors)]
    for name, r in results.items():
        cells = [f"{r['compile_s'][w]:.1f}" if w in r["compile_s"] else "failed" for w in errors]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    failures = [(n, w, f) for n, r in results.items() for w, f in r["failures"].items()]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {n} / {w}: {f}" for n, w, f in failures]
    write("suite_int8", report, lines)


def render(report: dict) -> None:
    if report["command"].endswith("--int8"):
        render_int8(report)
        return
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

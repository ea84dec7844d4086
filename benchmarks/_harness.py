"""Shared timing for the benchmarks: interleaved rounds and medians (machines here are noisy),
and results written as JSON + markdown under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def time_us(fn: Callable[[], object], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e6


def interleaved_medians(
    cases: dict[str, Callable[[], object]], *, runs: int, rounds: int, warmup: int = 100
) -> dict[str, float]:
    """Median us per call for each case, rounds interleaved so drift hits all cases alike."""
    stats = interleaved_stats(cases, runs=runs, rounds=rounds, warmup=warmup)
    return {name: v["median_us"] for name, v in stats.items()}


def interleaved_stats(
    cases: dict[str, Callable[[], object]],
    *,
    runs: int,
    rounds: int,
    warmup: int = 20,
    settle_s: float = 0.05,
) -> dict[str, dict[str, float]]:
    """Median and min (over rounds) of us per call for each case, rounds interleaved.

    Between cases the process sleeps `settle_s`: ONNX Runtime's and OpenMP's worker threads
    spin for a while after a call, and on 2 cores that spinning slowed whichever case ran
    next (eager looked up to 3x slower right after an ORT case)."""
    with torch.no_grad():
        for fn in cases.values():
            time_us(fn, warmup)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                time.sleep(settle_s)
                fn()  # one untimed call: wakes this runtime's threads
                samples[name].append(time_us(fn, runs))
    return {
        name: {"median_us": statistics.median(v), "min_us": min(v)} for name, v in samples.items()
    }


def machine() -> str:
    """The CPU, its bf16/int8 matrix and vector extensions (they decide what lower-precision
    columns mean) and torch's thread count."""
    from nativert.backend.autotune import machine as cpu

    return f"{platform.machine()}, {cpu()}, {torch.get_num_threads()} torch threads"


def write(name: str, result: dict, lines: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32}


def plain_onnx(model, inputs) -> bytes:
    """The whole fp32 model through torch.onnx.export, as an ORT user exports it."""
    onnx_program = torch.onnx.export(torch.export.export(model, inputs), dynamo=True, verbose=False)
    return onnx_program.model_proto.SerializeToString()


def plain_ort_runner(model, inputs, expected):
    """The whole model in one ONNX Runtime session, called as an ORT user would (IOBinding,
    fresh output per call). `expected`: the eager output (its shape and dtype)."""
    return ort_session_runner(plain_onnx(model, inputs), inputs, expected)


def ort_session_runner(onnx_model: bytes, inputs, expected):
    """One ORT session over `onnx_model`, called with IOBinding and a fresh output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (out_name,) = [o.name for o in session.get_outputs()]
    binding = session.io_binding()

    def run():
        out = torch.empty(expected.shape, dtype=expected.dtype)
        for name, x in zip(names, inputs, strict=True):
            binding.bind_input(name, "cpu", 0, _NP[x.dtype], x.shape, x.data_ptr())
        binding.bind_output(out_name, "cpu", 0, _NP[out.dtype], out.shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return run

"""Per-call cost of running a model lowered whole to onnxruntime, against plain ONNX Runtime.

    python benchmarks/ort_overhead.py [--rounds 15] [--models mlp,convnet] [--cases a,b]

Models at realistic sizes (benchmarks/models.py: 3x Linear(512) at batch 32, ~0.2-0.4 ms; a
conv-bn-relu x4 net at 1x3x64x64, ~1-2 ms): a Linear(16, 16) shows only call overhead and
hides what happens to caches and threads. Cases, timed in interleaved rounds in random order:
  plain_ort           the model through torch.onnx.export (default optimize) in its own
                      session, called with one IOBinding whose input and output are bound
                      once (the floor an ORT user gets; the reference for every ratio)
  session             nativert's own session (weights added as external initializers),
                      bound once the same way: export settings and weight sharing alone
  session_fresh       nativert's session with a different input tensor every call (cycled
                      through 8 live tensors, so the pointer always changes) and a new
                      output tensor allocated and bound every call: a raw caller with new
                      tensors
  delegate            OnnxRuntimeExecutor.run, the same input tensor every call
  delegate_fresh      OnnxRuntimeExecutor.run, a different input tensor every call
  executor            nativert.Executor, the same input tensor every call
  executor_fresh      nativert.Executor, a different input tensor every call
  module              the delegated program's .module() (call_delegate dispatch)
  eager               the PyTorch model
Writes benchmarks/results/ort_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from _harness import machine, write
from models import make

import nativert

_NP = {torch.float32: np.float32}
FRESH = 8  # live input tensors cycled by the *_fresh cases


def _busy_s() -> float | None:
    """CPU seconds every process on the machine has used so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _others(busy: float | None, cpu: float, elapsed: float) -> float:
    """Cores other processes kept busy since (`busy`, `cpu`) were read, `elapsed` s ago."""
    if busy is None:
        return 0.0
    mine = sum(os.times()[:2]) - cpu
    return max(0.0, (_busy_s() - busy - mine) / elapsed)


def wait_for_quiet(threshold: float, max_wait_s: float = 20.0, window_s: float = 0.2) -> None:
    """Wait (at most `max_wait_s`) until other processes use under `threshold` cores."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        busy, cpu = _busy_s(), sum(os.times()[:2])
        time.sleep(window_s)
        if _others(busy, cpu, window_s) < threshold:
            return


def paired_rounds(
    cases: dict[str, Callable[[], object]],
    *,
    runs: dict[str, int] | int,
    rounds: int,
    reference: str,
    settle_s: float = 0.2,
    quiet: float = 0.15,
) -> dict[str, dict[str, float]]:
    """Median us per call, and the median over rounds of each case's ratio to `reference`
    in the same round (rounds in random order; drift on a shared machine hits a round's
    cases alike), and the ratio of the fastest rounds (`min_ratio`, the least disturbed).
    Before each sample the process sleeps `settle_s`: ORT's workers from the last case's
    session spin on, and two identical sessions read 30% apart after 20 ms of rest, 7%
    after 200 ms.

    ONNX Runtime's and OpenMP's threads spin, so on a small machine another process's load
    multiplies their latency (2-30x measured on 2 cores): a sample taken while other
    processes used more than `quiet` cores is taken again once they calm down (twice at
    most). `other_cores`: the median such load over the samples kept (0 on a quiet
    machine); `quiet_share`: the share of samples taken under `quiet`."""
    per_case = runs if isinstance(runs, dict) else dict.fromkeys(cases, runs)
    times: dict[str, list[float]] = {name: [] for name in cases}
    others: list[float] = []
    with torch.no_grad():
        for fn in cases.values():
            for _ in range(20):
                fn()
        for _ in range(rounds):
            order = list(cases.items())
            random.shuffle(order)
            for name, fn in order:
                for attempt in range(3):
                    if attempt:
                        wait_for_quiet(quiet)
                    time.sleep(settle_s)  # let the last case's spinning threads sleep
                    fn()
                    busy, cpu = _busy_s(), sum(os.times()[:2])
                    start = time.perf_counter()
                    for _ in range(per_case[name]):
                        fn()
                    elapsed = time.perf_counter() - start
                    load = _others(busy, cpu, elapsed)
                    if load < quiet:
                        break
                times[name].append(elapsed / per_case[name] * 1e6)
                others.append(load)
    ref = times[reference]
    stats = {
        name: {
            "median_us": round(statistics.median(v), 2),
            "min_us": round(min(v), 2),
            "ratio": round(statistics.median(a / b for a, b in zip(v, ref, strict=True)), 3),
            "min_ratio": round(min(v) / min(ref), 3),
        }
        for name, v in times.items()
    }
    stats["other_cores"] = round(statistics.median(others), 2)
    stats["quiet_share"] = round(sum(o < quiet for o in others) / len(others), 2)
    return stats


def plain_session(model: torch.nn.Module, x: torch.Tensor, out: torch.Tensor):
    """A plain ORT user's session and a binding with `x` and `out` bound once (the caller
    keeps both alive)."""
    import onnxruntime as ort

    proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, bound_once(session, x, out)


def bound_once(session, x: torch.Tensor, out: torch.Tensor):
    binding = session.io_binding()
    (name,) = [i.name for i in session.get_inputs()]
    (out_name,) = [o.name for o in session.get_outputs()]
    binding.bind_input(name, "cpu", 0, _NP[x.dtype], x.shape, x.data_ptr())
    binding.bind_output(out_name, "cpu", 0, _NP[out.dtype], out.shape, out.data_ptr())
    return binding


def model_cases(name: str) -> tuple[dict[str, Callable[[], object]], torch.Tensor]:
    model, (x,) = make(name)
    with torch.no_grad():
        expected = model(x)
    program = nativert.to_backend(
        torch.export.export(model, (x,)), nativert.AllNodePartitioner("onnxruntime")
    )
    executor = nativert.Executor(program)
    (lowered,) = nativert.lowered_modules(program)
    delegate = lowered.executor
    module = program.module()
    session = delegate.active_state().session  # the very session the delegate runs

    outs = torch.empty_like(expected), torch.empty_like(expected)  # bound: keep them alive
    plain, plain_binding = plain_session(model, x, outs[0])
    ours = bound_once(session, x, outs[1])
    fresh_binding = session.io_binding()
    (in_name,) = [i.name for i in session.get_inputs()]
    (out_name,) = [o.name for o in session.get_outputs()]
    xs = itertools.cycle([torch.randn_like(x) for _ in range(FRESH)])

    def session_fresh():
        t = next(xs)
        out = torch.empty_like(expected)
        fresh_binding.bind_input(in_name, "cpu", 0, np.float32, t.shape, t.data_ptr())
        fresh_binding.bind_output(out_name, "cpu", 0, np.float32, out.shape, out.data_ptr())
        session.run_with_iobinding(fresh_binding)
        return out

    cases = {
        "plain_ort": lambda: (plain.run_with_iobinding(plain_binding), outs[0]),
        "session": lambda: (session.run_with_iobinding(ours), outs[1]),
        "session_fresh": session_fresh,
        "delegate": lambda: delegate.run([x]),
        "delegate_fresh": lambda: delegate.run([next(xs)]),
        "executor": lambda: executor(x),
        "executor_fresh": lambda: executor(next(xs)),
        "module": lambda: module(x),
        "eager": lambda: model(x),
    }
    with torch.no_grad():
        for check in (executor(x), delegate.run([x])[0], module(x)):
            torch.testing.assert_close(check, expected, atol=1e-4, rtol=1e-4)
    return cases, expected


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--models", default="mlp,convnet")
    parser.add_argument("--cases", default=None, help="a subset, e.g. plain_ort,executor")
    args = parser.parse_args()
    torch.manual_seed(0)

    results = {}
    for name in args.models.split(","):
        cases, _ = model_cases(name)
        if args.cases:
            cases = {case: cases[case] for case in ["plain_ort", *args.cases.split(",")]}
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(20):
                cases["plain_ort"]()
            call_s = (time.perf_counter() - start) / 20
        runs = max(10, int(0.05 / call_s))  # about 50 ms of calls per case and round
        results[name] = paired_rounds(cases, runs=runs, rounds=args.rounds, reference="plain_ort")

    command = f"python benchmarks/ort_overhead.py --rounds {args.rounds} --models {args.models}"
    if args.cases:
        command += f" --cases {args.cases}"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "models": results,
    }
    names = [k for k in next(iter(results.values())) if k not in ("other_cores", "quiet_share")]
    lines = [
        f"# onnxruntime delegate: per-call cost at realistic sizes ({result['date']})",
        "",
        f"`{command}` on {result['machine']}; torch {result['torch']}, onnxruntime "
        f"{result['onnxruntime']}. Median us per call over {args.rounds} rounds (cases in "
        "random order in each round), the median of each round's ratio to plain_ort, and "
        "the ratio of the fastest rounds. "
        "The cases are described in the script's docstring; `_fresh`: a different input "
        "tensor (and, for the raw session, a newly allocated output) every call.",
        "",
        "| case | " + " | ".join(f"{m} us | {m} / plain_ort | min / min" for m in results) + " |",
        "|---|" + "---|---|---|" * len(results),
    ]
    for case in names:
        cells = [
            f"{r[case]['median_us']:.1f} | {r[case]['ratio']:.3f} | {r[case]['min_ratio']:.3f}"
            for r in results.values()
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Load from other processes while timing (median cores; share of samples taken "
        "under 0.15 cores): "
        + ", ".join(f"{m} {r['other_cores']} ({r['quiet_share']:.0%})" for m, r in results.items())
        + ". ONNX Runtime's threads spin, so on a shared 2-core machine any other load shows "
        "up as noise in every case.",
    ]
    write("ort_overhead", result, lines)


if __name__ == "__main__":
    main()

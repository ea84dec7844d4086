"""Executor overhead per delegate call, and ONNX Runtime's spinning threads next to others.

    python benchmarks/executor_overhead.py [--rounds 15]

1. A chain of 8 Linear(16,16) regions split by a PyTorch custom op (8 ORT delegate calls):
   (Executor time - raw ORT time of the 8 sessions - the custom ops' eager time) / 8.
   Target: at most 10 us per delegate call. (Whole-model parity with plain ONNX Runtime, at
   realistic sizes: benchmarks/ort_overhead.py.)
2. The onnxruntime compile spec `intra_op_spinning` ("always", ORT's default and ours: its
   intra-op threads keep spinning when idle; "never": they sleep), in three situations:
   - hybrid: benchmarks/models.py's custom_op model (two ORT regions around a custom op
     that PyTorch runs, with its own threads);
   - whole: the MLP and the conv net lowered whole, called back to back (plain_ort: the
     model in a plain ORT session, ORT's defaults, for reference);
   - shared: the MLP lowered whole, each call followed by the conv net in eager PyTorch (a
     second runtime's threads in the same process), timed as the pair.
   `hot`: back-to-back calls; `idle`: one call after 30 ms idle.
Interleaved rounds in random order; medians and per-round ratios. Writes
benchmarks/results/executor_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from _harness import machine, write
from models import make
from ort_overhead import paired_rounds, plain_session, wait_for_quiet

import nativert

MODES = ("always", "never")


@torch.library.custom_op("nativert_bench::shift", mutates_args=())
def shift(x: torch.Tensor) -> torch.Tensor:
    return x + 0.5


@shift.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Chain(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(k))

    def forward(self, x):
        for layer in self.layers:
            x = shift(layer(x))
        return x


def raw_caller(lowered, example):
    """Call a delegate's ORT session directly with fresh output tensors, like a caller must."""
    executor = lowered.executor
    session = executor.active_state().session
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    binding = session.io_binding()
    with torch.no_grad():
        shape = executor.run([example])[0].shape

    def call():
        out = torch.empty(shape)
        binding.bind_input(in_name, "cpu", 0, np.float32, example.shape, example.data_ptr())
        binding.bind_output(out_name, "cpu", 0, np.float32, out.shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return call


def per_delegate_call(rounds: int) -> dict:
    k = 8
    chain = Chain(k).eval()
    h = torch.randn(4, 16)
    program = nativert.to_backend(torch.export.export(chain, (h,)))
    assert len(nativert.delegate_nodes(program)) == k
    executor = nativert.Executor(program)
    regions = [raw_caller(lw, h) for lw in nativert.lowered_modules(program)]
    with torch.no_grad():
        torch.testing.assert_close(executor(h), chain(h), atol=1e-5, rtol=1e-5)
    cases = {
        "chain_executor": lambda: executor(h),
        "chain_raw_ort_regions": lambda: [call() for call in regions],
        "chain_custom_ops": lambda: [shift(h) for _ in range(k)],
    }
    stats = paired_rounds(cases, runs=500, rounds=rounds, reference="chain_executor")
    m = {name: stats[name]["median_us"] for name in cases}
    quiet = stats["quiet_share"]
    per_call = (m["chain_executor"] - m["chain_raw_ort_regions"] - m["chain_custom_ops"]) / k
    return {
        "median_us": m,
        "overhead_us_per_delegate_call": round(per_call, 2),
        "quiet_share": quiet,
    }


def executors(name: str, *, whole: bool) -> tuple[dict, torch.nn.Module, tuple]:
    """One Executor per spinning mode (the default partitioner, or all to onnxruntime)."""
    model, inputs = make(name)
    program = torch.export.export(model, inputs)
    made = {}
    for mode in MODES:
        specs = {"intra_op_spinning": mode}
        if whole:
            lowered = nativert.to_backend(
                program, nativert.AllNodePartitioner("onnxruntime", compile_specs=specs)
            )
        else:
            lowered = nativert.to_backend(program, compile_specs={"onnxruntime": specs})
        made[mode] = nativert.Executor(lowered)
    with torch.no_grad():
        expected = model(*inputs)
        for executor in made.values():
            torch.testing.assert_close(executor(*inputs), expected, atol=1e-4, rtol=1e-4)
    return made, model, inputs


def idle_latency(cases: dict, rounds: int, idle_s: float = 0.03) -> dict[str, float]:
    """Median us of one call after `idle_s` without calls (spinning threads have stopped)."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(rounds):
            wait_for_quiet(0.15, max_wait_s=5.0)
            for name, fn in random.sample(list(cases.items()), len(cases)):
                time.sleep(idle_s)
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) * 1e6)
    return {name: round(statistics.median(v), 1) for name, v in samples.items()}


def hybrid_cases() -> tuple[dict, str]:
    made, model, (x,) = executors("custom_op", whole=False)
    assert len(nativert.delegate_nodes(made["always"].program)) == 2
    cases = {mode: (lambda e=e: e(x)) for mode, e in made.items()}
    cases["eager"] = lambda: model(x)
    return cases, "always"


def whole_cases(name: str) -> tuple[dict, str]:
    made, model, (x,) = executors(name, whole=True)
    cases = {mode: (lambda e=e: e(x)) for mode, e in made.items()}
    with torch.no_grad():
        out = model(x)
    session, binding = plain_session(model, x, out)
    cases["plain_ort"] = lambda: (session.run_with_iobinding(binding), out)
    return cases, "plain_ort"


def shared_cases() -> tuple[dict, str]:
    made, _, (x,) = executors("mlp", whole=True)
    other, (image,) = make("convnet")
    cases = {mode: (lambda e=e: (e(x), other(image))) for mode, e in made.items()}
    cases["eager_convnet_alone"] = lambda: other(image)
    return cases, "always"


def spinning(rounds: int) -> dict:
    results = {
        "hybrid": hybrid_cases(),
        "whole_mlp": whole_cases("mlp"),
        "whole_convnet": whole_cases("convnet"),
        "shared": shared_cases(),
    }
    out = {}
    for situation, (cases, reference) in results.items():
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(10):
                cases[reference]()
            call_s = (time.perf_counter() - start) / 10
        runs = max(10, int(0.05 / call_s))
        hot = paired_rounds(cases, runs=runs, rounds=rounds, reference=reference)
        idle = idle_latency(cases, rounds=max(rounds, 20))
        out[situation] = {
            "reference": reference,
            "other_cores": hot.pop("other_cores"),
            "quiet_share": hot.pop("quiet_share"),
            "cases": {name: {**hot[name], "idle_us": idle[name]} for name in cases if name in hot},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    chain = per_delegate_call(args.rounds)
    spin = spinning(args.rounds)
    command = f"python benchmarks/executor_overhead.py --rounds {args.rounds}"
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "chain": chain,
        "spinning": spin,
    }
    lines = [
        f"# Executor overhead and ORT spinning ({result['date']})",
        "",
        f"`{command}` on {result['machine']}, onnxruntime {result['onnxruntime']}; medians "
        "of interleaved rounds in random order.",
        "",
        "## Per delegate call",
        "",
        "| case | median us |",
        "|---|---|",
        *(f"| {name} | {v:.2f} |" for name, v in chain["median_us"].items()),
        "",
        f"Overhead per delegate call: {chain['overhead_us_per_delegate_call']:.2f} us "
        "(target <= 10)",
        "",
        "## intra_op_spinning",
        "",
        "hot: back-to-back calls (median us, and the median per-round ratio to the "
        "situation's reference); idle: one call after 30 ms idle. other cores: the load "
        "other processes put on the machine meanwhile.",
    ]
    for situation, r in spin.items():
        lines += [
            "",
            f"### {situation} (reference {r['reference']}; other cores {r['other_cores']}, "
            f"{r['quiet_share']:.0%} of samples quiet)",
            "",
            "| case | hot us | hot ratio | idle us |",
            "|---|---|---|---|",
        ]
        for name, c in r["cases"].items():
            lines.append(f"| {name} | {c['median_us']:.1f} | {c['ratio']:.3f} | {c['idle_us']} |")
    write("executor_overhead", result, lines)


if __name__ == "__main__":
    main()

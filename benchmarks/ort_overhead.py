"""Per-call overhead of the onnxruntime delegate against raw ONNX Runtime IOBinding.

    python benchmarks/ort_overhead.py [--runs 2000] [--rounds 7]

A tiny model (where overhead dominates) is lowered whole to onnxruntime. In interleaved
rounds (machines here are noisy), it times:
  raw_reused    session.run_with_iobinding with one binding and preallocated outputs
                (the floor: no per-call work at all)
  raw_rebind    raw, but binding fresh input/output pointers and allocating the output per
                call, as any caller with new tensors must
  executor      nativert's OnnxRuntimeExecutor.run (what the Executor will call)
  module        the delegated program's .module() (call_delegate dispatch + autograd check)
  eager         the PyTorch model
Writes benchmarks/results/ort_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _harness import interleaved_medians, machine, write

import nativert


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.fc(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(4, 16)
    program = nativert.to_backend(
        torch.export.export(model, (x,)), nativert.AllNodePartitioner("onnxruntime")
    )
    (lowered,) = nativert.lowered_modules(program)
    executor = lowered.executor
    runnable = program.module()
    session = executor.active_state().session  # the very session the executor runs
    in_name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    reused = session.io_binding()
    out = torch.empty(4, 16)
    reused.bind_input(in_name, "cpu", 0, np.float32, list(x.shape), x.data_ptr())
    reused.bind_output(out_name, "cpu", 0, np.float32, list(out.shape), out.data_ptr())

    rebind = session.io_binding()

    def raw_rebind():
        result = torch.empty(4, 16)
        rebind.bind_input(in_name, "cpu", 0, np.float32, x.shape, x.data_ptr())
        rebind.bind_output(out_name, "cpu", 0, np.float32, result.shape, result.data_ptr())
        session.run_with_iobinding(rebind)
        return result

    cases = {
        "raw_reused": lambda: session.run_with_iobinding(reused),
        "raw_rebind": raw_rebind,
        "executor": lambda: executor.run([x]),
        "module": lambda: runnable(x),
        "eager": lambda: model(x),
    }
    with torch.no_grad():
        assert torch.allclose(executor.run([x])[0], model(x), atol=1e-5)
    medians = interleaved_medians(cases, runs=args.runs, rounds=args.rounds, warmup=200)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/ort_overhead.py --runs {args.runs} --rounds {args.rounds}",
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "median_us": {k: round(v, 2) for k, v in medians.items()},
        "executor_overhead_us_vs_raw_reused": round(medians["executor"] - medians["raw_reused"], 2),
        "executor_overhead_us_vs_raw_rebind": round(medians["executor"] - medians["raw_rebind"], 2),
    }
    lines = [
        f"# onnxruntime delegate per-call overhead ({result['date']})",
        "",
        f"`{result['command']}` on {result['machine']}; torch {result['torch']}, "
        f"onnxruntime {result['onnxruntime']}. Median of {args.rounds} interleaved rounds "
        f"of {args.runs} calls; Linear(16, 16) + ReLU on a 4x16 input.",
        "",
        "| case | median us |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in result["median_us"].items()),
        "",
        f"executor overhead: {result['executor_overhead_us_vs_raw_reused']:+.2f} us vs "
        f"raw_reused, {result['executor_overhead_us_vs_raw_rebind']:+.2f} us vs raw_rebind",
    ]
    write("ort_overhead", result, lines)


if __name__ == "__main__":
    main()

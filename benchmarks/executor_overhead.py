"""Executor overhead: whole-model latency vs the ORT session, and cost per delegate call.

    python benchmarks/executor_overhead.py [--runs 1000] [--rounds 7]

1. The built-in MLP and transformer block, each lowered whole to onnxruntime: Executor
   median latency against calling the same ORT session directly (IOBinding with fresh
   pointers, as any caller must). Target: at most 5% more.
2. A chain of 8 Linear(16,16) regions split by a PyTorch custom op (8 ORT delegate calls):
   (Executor time - raw ORT time of the 8 sessions - the custom ops' eager time) / 8.
   Target: at most 10 us per delegate call.
Interleaved rounds, medians; writes benchmarks/results/executor_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _harness import interleaved_medians, machine, write

import nativert
from nativert.models import build


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)

    mlp, (x,) = build("mlp")
    ort = nativert.AllNodePartitioner("onnxruntime")
    mlp_program = nativert.to_backend(torch.export.export(mlp, (x,)), ort)
    mlp_executor = nativert.Executor(mlp_program)
    mlp_module = mlp_program.module()
    (mlp_lowered,) = nativert.lowered_modules(mlp_program)
    mlp_raw = raw_caller(mlp_lowered, x)

    block, (tokens,) = build("transformer")
    block_program = nativert.to_backend(torch.export.export(block, (tokens,)), ort)
    block_executor = nativert.Executor(block_program)
    (block_lowered,) = nativert.lowered_modules(block_program)
    block_raw = raw_caller(block_lowered, tokens)

    k = 8
    chain = Chain(k).eval()
    h = torch.randn(4, 16)
    chain_program = nativert.to_backend(torch.export.export(chain, (h,)))
    assert len(nativert.delegate_nodes(chain_program)) == k
    chain_executor = nativert.Executor(chain_program)
    raw_regions = [raw_caller(lw, h) for lw in nativert.lowered_modules(chain_program)]

    cases = {
        "mlp_executor": lambda: mlp_executor(x),
        "mlp_raw_ort": mlp_raw,
        "mlp_module": lambda: mlp_module(x),
        "mlp_eager": lambda: mlp(x),
        "transformer_executor": lambda: block_executor(tokens),
        "transformer_raw_ort": block_raw,
        "chain_executor": lambda: chain_executor(h),
        "chain_raw_ort_regions": lambda: [call() for call in raw_regions],
        "chain_custom_ops": lambda: [shift(h) for _ in range(k)],
    }
    with torch.no_grad():
        assert torch.allclose(mlp_executor(x), mlp(x), atol=1e-5)
        assert torch.allclose(chain_executor(h), chain(h), atol=1e-5)
        assert torch.allclose(block_executor(tokens), block(tokens), atol=1e-5)
    m = interleaved_medians(cases, runs=args.runs, rounds=args.rounds)
    per_call = (m["chain_executor"] - m["chain_raw_ort_regions"] - m["chain_custom_ops"]) / k
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/executor_overhead.py --runs {args.runs} "
        f"--rounds {args.rounds}",
        "machine": machine(),
        "median_us": {k_: round(v, 2) for k_, v in m.items()},
        "mlp_executor_vs_raw_ort": round(m["mlp_executor"] / m["mlp_raw_ort"], 3),
        "transformer_executor_vs_raw_ort": round(
            m["transformer_executor"] / m["transformer_raw_ort"], 3
        ),
        "overhead_us_per_delegate_call": round(per_call, 2),
    }
    lines = [
        f"# Executor overhead ({result['date']})",
        "",
        f"`{result['command']}` on {result['machine']}; medians of interleaved rounds.",
        "",
        "| case | median us |",
        "|---|---|",
        *(f"| {name} | {v:.2f} |" for name, v in result["median_us"].items()),
        "",
        f"Lowered whole, Executor / raw ORT session: MLP {result['mlp_executor_vs_raw_ort']:.3f}, "
        f"transformer block {result['transformer_executor_vs_raw_ort']:.3f} (target <= 1.05)",
        f"Overhead per delegate call: {result['overhead_us_per_delegate_call']:.2f} us "
        "(target <= 10)",
    ]
    write("executor_overhead", result, lines)


if __name__ == "__main__":
    main()

"""Training step time: eager, torch.compile (inductor) and torch.compile(backend="nativert").

    python benchmarks/train.py [--steps 40] [--models mlp,convnet,bert] [--repeats 2]
                               [--options '{"autotune": true}']

One step = forward, loss, backward, optimizer step. Each (model, backend) runs in its own fresh
process (thread pools and caches start cold, as a user's would), `--repeats` times, in
interleaved order; the figure is the median step time over steps 10..N. The losses after N
steps are compared with eager's (same seed, same data).

  mlp      MLP 256-1024-1024-10 (GELU), batch 64, cross-entropy, SGD
  convnet  2 conv + BatchNorm + ReLU, 16x3x32x32, cross-entropy, SGD
  bert     the suite's BERT-style encoder (4 layers, 256 hidden), batch 16 x 64 tokens,
           AdamW, loss = mean of the last hidden state squared

Writes benchmarks/results/<--name>.{json,md} (default train). "nativert ran on": what each
Dynamo graph ran on in each run (compare_with_pytorch: nativert, pytorch or inductor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BACKENDS = ("eager", "inductor", "nativert")


def _mlp():
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
    )
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    return model, x, lambda out: nn.functional.cross_entropy(out, y), "sgd"


def _convnet():
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    return model, x, lambda out: nn.functional.cross_entropy(out, y), "sgd"


def _bert():
    import torch

    sys.path.insert(0, str(HERE))
    from models import _bert as bert

    model = bert()
    x = torch.randint(0, 1000, (16, 64))
    return model, x, lambda out: out.pow(2).mean(), "adamw"


MODELS = {"mlp": _mlp, "convnet": _convnet, "bert": _bert}


def child(model_name: str, backend: str, steps: int, options: dict) -> dict:
    """Runs in a fresh process: `steps` training steps, times and the final loss."""
    import torch

    torch.manual_seed(0)
    model, x, loss_fn, optimizer_name = MODELS[model_name]()
    model.train()
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if backend == "inductor":
        step_model = torch.compile(model)
    elif backend == "nativert":
        step_model = torch.compile(model, backend="nativert", options=options)
    else:
        step_model = model
    times, loss = [], None
    compile_s = None
    for step in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(step_model(x))
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if step == 0:
            compile_s = elapsed
        times.append(elapsed * 1e3)
    runs_on = None
    if backend == "nativert":
        import nativert

        runs_on = [r.runs_on for r in nativert.compile_reports()]
    return {
        "runs_on": runs_on,
        "step_ms": statistics.median(times[10:]),
        "first_step_s": round(compile_s, 2),
        "loss": float(loss),
    }


def run_child(model_name: str, backend: str, steps: int, options: dict) -> dict:
    call = f"train.child({model_name!r}, {backend!r}, {steps}, json.loads({json.dumps(options)!r}))"
    code = f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import train\n"
    code += f"print(json.dumps({call}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError(f"{model_name}/{backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--options", default="{}", help="torch.compile options for nativert")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--name", default="train", help="results file name (without suffix)")
    args = parser.parse_args()
    options = json.loads(args.options)
    names = args.models.split(",")
    results: dict[str, dict[str, list[dict]]] = {n: {b: [] for b in BACKENDS} for n in names}
    for _ in range(args.repeats):
        for name in names:
            for backend in BACKENDS:
                result = run_child(name, backend, args.steps, options)
                results[name][backend].append(result)
                print(name, backend, result, flush=True)
    rows = []
    for name in names:
        step = {b: statistics.median(r["step_ms"] for r in results[name][b]) for b in BACKENDS}
        loss = {b: results[name][b][0]["loss"] for b in BACKENDS}
        runs_on = sorted({str(r.get("runs_on")) for r in results[name]["nativert"]})
        rows.append({"model": name, "step_ms": step, "loss": loss, "runs_on": ", ".join(runs_on)})
    lines = [
        f"Training steps ({args.steps} steps, median of steps 10..N, fresh process each, "
        f"median over {args.repeats} runs; nativert options {json.dumps(options)})",
        "",
        "| model | eager ms | inductor ms | nativert ms | nativert / eager | nativert / inductor "
        "| loss eager | loss nativert | nativert ran on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        s, loss = row["step_ms"], row["loss"]
        lines.append(
            f"| {row['model']} | {s['eager']:.2f} | {s['inductor']:.2f} | {s['nativert']:.2f} | "
            f"{s['nativert'] / s['eager']:.2f}x | {s['nativert'] / s['inductor']:.2f}x | "
            f"{loss['eager']:.5f} | {loss['nativert']:.5f} | {row['runs_on']} |"
        )
    if args.no_write:
        print("\n".join(lines))
    else:
        sys.path.insert(0, str(HERE))
        from _harness import machine, write

        write(args.name, {"machine": machine(), "options": options, "runs": results}, lines)


if __name__ == "__main__":
    main()

"""ONNX Runtime with and without weight prepacking, on the suite models: what the onnxruntime
compile spec `prepack_weights=False` costs (it lets processes share a package's weights).

    python benchmarks/prepack.py --runs 20 --rounds 7

One plain ORT session per setting over the exported model (2 threads), timed interleaved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _harness import interleaved_stats, machine, plain_onnx, write  # noqa: E402
from models import make  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,convnet,resnet_stack,transformer_block,bert,gpt2")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    import onnxruntime as ort

    results = {}
    lines = [
        f"# ONNX Runtime weight prepacking ({machine()})",
        "",
        f"`python benchmarks/prepack.py --runs {args.runs} --rounds {args.rounds}`",
        "",
        "| model | prepacked (us) | not prepacked (us) | not / prepacked |",
        "|---|---|---|---|",
    ]
    for name in args.models.split(","):
        model, inputs = make(name)
        proto = plain_onnx(model, inputs)
        cases = {}
        for setting in ("prepacked", "not_prepacked"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            if setting == "not_prepacked":
                options.add_session_config_entry("session.disable_prepacking", "1")
            session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
            feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
            cases[setting] = lambda s=session, f=feed: s.run(None, f)
        stats = interleaved_stats(cases, runs=args.runs, rounds=args.rounds)
        on, off = stats["prepacked"]["median_us"], stats["not_prepacked"]["median_us"]
        results[name] = {"prepacked_us": on, "not_prepacked_us": off, "ratio": off / on}
        lines.append(f"| {name} | {on:.0f} | {off:.0f} | {off / on:.2f} |")
        print(lines[-1], flush=True)
    write("prepack", {"machine": machine(), "results": results}, lines)


if __name__ == "__main__":
    main()

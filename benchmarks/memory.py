"""Memory: resident memory and load time of one model served by each runtime, each measured in
a fresh process.

    python benchmarks/memory.py                      # build files, measure every way
    python benchmarks/memory.py --models gpt2 --ways ort,executor

For each model the build step writes, once, into --dir:
- nativert packages, the model lowered whole and saved: `<model>.pt2` (onnxruntime),
  `<model>_noprepack.pt2` (onnxruntime with the compile spec `prepack_weights=False`),
  `<model>_folded*.pt2` (the same two with `passes=INFERENCE_PIPELINE`: batch norms folded
  into convolutions at lowering), `<model>_openvino.pt2` and `<model>_aoti_delegate.pt2`;
- the peers' files: the plain ONNX file an ORT user exports (`<model>.onnx`, weights inside)
  and the same with its weights in an external data file (`<model>_ext.onnx`, how large models
  ship), OpenVINO's IR (`<model>.xml/.bin`, f32) and an AOTInductor package (`<model>_aoti.pt2`).

Then each way runs in its own process: import the libraries, read RSS and PSS (the baseline),
load the model, run it 3 times, read them again. Reported: what loading and running added
(MiB), the peak (VmHWM) above the baseline, the load time, and the median time of 10 further
calls (a sanity check that the lean ways are not slow; benchmarks/suite.py measures speed
properly). `replicas*` run two processes that each load one nativert package with an
Executor, as two serving replicas on one node do, both alive at once, and report the sum of
their PSS (shared pages counted once in all) against one process's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _harness import machine, write  # noqa: E402


def gpt2() -> nn.Module:
    """GPT-2 small's shape (12 x 768) with an 8k vocabulary: 92M parameters."""
    from models import HiddenStates
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        vocab_size=8192, n_embd=768, n_layer=12, n_head=12, n_positions=1024, use_cache=False
    )
    return HiddenStates(GPT2Model(config))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet50() -> nn.Module:
    """ResNet-50's layout (bottlenecks 3-4-6-3, 64 to 2048 channels, 1000 classes): 25.6M
    parameters."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


# name: (the model, its example inputs)
MODELS = {
    "gpt2": (gpt2, lambda: (torch.randint(0, 8192, (1, 64)),)),
    "resnet50": (resnet50, lambda: (torch.randn(1, 3, 224, 224),)),
}


def make(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model, inputs = MODELS[name]
    return model().eval(), inputs()


def inputs_of(name: str) -> tuple:
    torch.manual_seed(0)
    return MODELS[name][1]()


def build(name: str, folder: Path) -> None:
    """Write every file the ways load (each once: delete --dir to rebuild)."""
    from _harness import plain_onnx

    import nativert
    from nativert.passes import INFERENCE_PIPELINE

    model = ep = None

    def program():
        nonlocal model, ep
        if ep is None:
            model, inputs = make(name)
            ep = torch.export.export(model, inputs)
        return ep

    with torch.no_grad():
        no_prepack = {"prepack_weights": False}
        for suffix, delegate, specs, passes in (
            ("", "onnxruntime", {}, None),
            ("_noprepack", "onnxruntime", no_prepack, None),
            ("_folded", "onnxruntime", {}, INFERENCE_PIPELINE),
            ("_folded_noprepack", "onnxruntime", no_prepack, INFERENCE_PIPELINE),
            ("_openvino", "openvino", {}, None),
            ("_aoti_delegate", "aoti", {}, None),
        ):
            pt2 = folder / f"{name}{suffix}.pt2"
            if not pt2.exists():
                lowered = nativert.to_backend(
                    program(),
                    delegates=[delegate],
                    cache_dir=None,
                    compile_specs={delegate: specs},
                    **({} if passes is None else {"passes": passes}),
                )
                nativert.save(lowered, pt2)
        if not (folder / f"{name}.onnx").exists():
            program()
            (folder / f"{name}.onnx").write_bytes(plain_onnx(model, ep.example_inputs[0]))
        if not (folder / f"{name}_ext.onnx").exists():
            import onnx

            proto = onnx.load(folder / f"{name}.onnx")
            onnx.save_model(
                proto,
                folder / f"{name}_ext.onnx",
                save_as_external_data=True,
                location=f"{name}_ext.data",
            )
        if not (folder / f"{name}.xml").exists():
            import openvino as ov

            ov.save_model(
                ov.convert_model(program()), folder / f"{name}.xml", compress_to_fp16=False
            )
        if not (folder / f"{name}_aoti.pt2").exists():
            torch._inductor.aoti_compile_and_package(
                program(), package_path=str(folder / f"{name}_aoti.pt2")
            )


def _ort(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]
    return lambda *xs: session.run(
        None, {n: x.numpy() for n, x in zip(feed_names, xs, strict=True)}
    )


def _openvino(path: Path):
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda *xs: request.infer([x.numpy() for x in xs])


def _aoti(path: Path):
    return torch._inductor.aoti_load_package(str(path))


def _executor(path: Path):
    import nativert

    return nativert.Executor(nativert.load(path))


def _module(path: Path):
    import nativert

    return nativert.load(path).module()


def _executor_trusted(path: Path):
    import nativert

    return nativert.Executor(nativert.load(path, trust_native_code=True))


# way: (what loads it, the file it loads)
WAYS = {
    "ort": (_ort, "{}.onnx"),
    "ort_external_data": (_ort, "{}_ext.onnx"),
    "openvino": (_openvino, "{}.xml"),
    "aoti": (_aoti, "{}_aoti.pt2"),
    "executor": (_executor, "{}.pt2"),
    "module": (_module, "{}.pt2"),
    "executor_noprepack": (_executor, "{}_noprepack.pt2"),
    "executor_folded": (_executor, "{}_folded.pt2"),
    "executor_folded_noprepack": (_executor, "{}_folded_noprepack.pt2"),
    "executor_openvino": (_executor, "{}_openvino.pt2"),
    "executor_aoti": (_executor_trusted, "{}_aoti_delegate.pt2"),
}


def measure(way: str, name: str, folder: Path, hold: bool = False) -> dict[str, float]:
    """In this (fresh) process: what loading `name` the `way` way and running it 3 times
    adds to memory, and how long the load took. With `hold`, print the result and wait for
    stdin to close before returning (so that two processes are alive at once)."""
    import onnxruntime  # noqa: F401  (libraries are the baseline, not the model)
    import openvino  # noqa: F401

    import nativert  # noqa: F401
    from nativert.backend.runtime.memory import process_memory as memory

    inputs = inputs_of(name)
    load, file = WAYS[way]
    before = memory()
    start = time.perf_counter()
    run = load(folder / file.format(name))
    load_s = time.perf_counter() - start
    loaded = memory()
    with torch.no_grad():
        for _ in range(3):
            run(*inputs)
        after = memory()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            run(*inputs)
            times.append(time.perf_counter() - start)
    result = {
        "load_s": load_s,
        "rss_load_mib": loaded["rss"] - before["rss"],
        "rss_mib": after["rss"] - before["rss"],
        "pss_mib": after["pss"] - before["pss"],
        "peak_mib": after["peak"] - before["rss"],
        "ms": sorted(times)[len(times) // 2] * 1e3,
    }
    if hold:
        print(json.dumps(result), flush=True)
        sys.stdin.read()
        result["pss_held_mib"] = memory()["pss"] - before["pss"]
    return result


def _child(way: str, name: str, folder: Path, hold: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--measure", way, "--models", name, "--dir", str(folder)]
    if hold:
        cmd.append("--hold")
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen, what: str) -> dict[str, float]:
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"{what} failed:\n{proc.stderr.read()[-4000:]}")
    return json.loads(line)


def replicas(name: str, folder: Path, way: str) -> dict[str, float]:
    """Two processes loading one package, both alive when each one's PSS is read."""
    first = _child(way, name, folder, hold=True)
    one = _result(first, f"replica 1 of {name}")
    second = _child(way, name, folder, hold=True)
    two = _result(second, f"replica 2 of {name}")
    # Read each one's PSS while both are alive: shared pages are split between them.
    first.stdin.close()
    second_pss = two["pss_mib"]
    first_pss = json.loads(first.stdout.read().strip().splitlines()[-1])["pss_held_mib"]
    second.stdin.close()
    second.wait()
    first.wait()
    return {
        "one_pss_mib": one["pss_mib"],
        "two_pss_mib": first_pss + second_pss,
        "ratio": (first_pss + second_pss) / one["pss_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    replicas_of = ["replicas", "replicas_noprepack", "replicas_folded_noprepack"]
    parser.add_argument("--ways", default=",".join([*WAYS, *replicas_of]))
    parser.add_argument("--dir", default="/tmp/nativert-memory")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one fresh process
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.dir)
    if args.measure:
        print(json.dumps(measure(args.measure, args.models, folder, args.hold)), flush=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    shared: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.models.split(","):
        build(name, folder)
        for way in args.ways.split(","):
            if way.startswith("replicas"):
                executor = way.replace("replicas", "executor")
                shared.setdefault(name, {})[executor] = replicas(name, folder, executor)
                print(name, way, shared[name][executor], flush=True)
                continue
            proc = _child(way, name, folder)
            results.setdefault(name, {})[way] = _result(proc, f"{way} on {name}")
            proc.communicate()
            print(name, way, results[name][way], flush=True)
    lines = [f"# Memory ({machine()})", "", f"`python {' '.join(sys.argv)}`", ""]
    for name, ways in results.items():
        lines += [
            f"## {name}",
            "",
            "| way | RSS added (MiB) | vs ort | PSS added | peak | load (s) | ms/call |",
            "|---|---|---|---|---|---|---|",
        ]
        base = ways.get("ort", {}).get("rss_mib")
        for way, r in ways.items():
            ratio = f"{r['rss_mib'] / base:.2f}x" if base else "-"
            lines.append(
                f"| {way} | {r['rss_mib']:.0f} | {ratio} | {r['pss_mib']:.0f} | "
                f"{r['peak_mib']:.0f} | {r['load_s']:.2f} | {r['ms']:.1f} |"
            )
        lines.append("")
        if name in shared:
            lines += [
                "| two replicas of | one (PSS MiB) | two (sum of PSS) | two / one |",
                "|---|---|---|---|",
            ]
            for way, r in shared[name].items():
                lines.append(
                    f"| {way} | {r['one_pss_mib']:.0f} | {r['two_pss_mib']:.0f} | "
                    f"{r['ratio']:.2f}x |"
                )
            lines.append("")
    write("memory", {"machine": machine(), "results": results, "replicas": shared}, lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

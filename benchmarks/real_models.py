"""How much of real architectures nativert delegates: torchvision, transformers and timm models
built from configs with random weights (nothing is downloaded), exported, lowered with the
default pipeline and run through the Executor.

    python benchmarks/real_models.py [--models resnet18,bert,...] [--compile]
                                     [--json PATH] [--markdown PATH] [--note TEXT]

Per model: compute nodes and delegated nodes as the delegation report counts them (every
call_function node: the report's rule) and again without plumbing (getitem, symbolic shape
arithmetic, runtime asserts such as aten._assert_tensor_metadata: nodes no runtime executes
as a kernel), regions per delegate, export and lowering seconds (payload cache off), the max
abs difference of the Executor's outputs against eager (and relative to the largest eager
output), and the ops left in PyTorch with their counts and the partitioner's reason. With
--compile, also the share of torch.compile(model, backend="nativert"), summed over its Dynamo
graphs. A model that fails records its error (first line, root cause, innermost nativert
frame) at the stage that failed; the others still run.

torchvision and timm are optional (the `bench` extra does not install them): their models
are skipped when the library is not installed. See import_torchvision for the one release
PyPI has for torch 2.13 (a CUDA build); install it, and timm, with --no-deps so that pip
never replaces torch."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from _harness import machine
from torch.utils import _pytree as pytree

import nativert
from nativert.backend.pipeline import lower_program
from nativert.delegate import default_delegates
from nativert.errors import first_line

# Nodes the report counts that are not kernels: tuple access, shape arithmetic, checks.
PLUMBING_OPS = frozenset(
    {
        "aten._assert_tensor_metadata.default",
        "aten._assert_scalar.default",
        "aten._assert_async.msg",
        "aten.sym_constrain_range_for_size.default",
        "aten.sym_size.int",
        "aten.sym_numel.default",
        "aten.sym_stride.int",
        "aten.sym_storage_offset.default",
    }
)

_KEEP_ALIVE: list[torch.library.Library] = []


def import_torchvision() -> tuple[Any, str]:
    """(torchvision or None, a note on how it was imported).

    PyPI's torchvision 0.28.0 (the release for torch 2.13) is a CUDA build for Linux
    (0.28.0+cu130): its _C.so links libtorch_cuda.so, so with torch 2.13.0+cpu the library
    does not load, and `import torchvision` then fails at register_fake("torchvision::nms")
    with "operator torchvision::nms does not exist". transformers imports torchvision when it
    is installed, so `from transformers import BertModel` fails too. The models here need
    none of torchvision's C++ ops (nms and the roi ops serve detection): declare the two
    schemas torchvision registers without checking that its library loaded, and import
    again. Call this before importing transformers."""
    if importlib.util.find_spec("torchvision") is None:
        return None, "torchvision is not installed"
    try:
        import torchvision

        return torchvision, f"torchvision {torchvision.__version__}"
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP_ALIVE.append(library)  # the schemas live as long as the Library object
    import torchvision

    return torchvision, (
        f"torchvision {torchvision.__version__}: its C++ ops did not load (a CUDA build on a "
        "CPU torch); torchvision::nms and ::qnms declared so that it imports"
    )


TORCHVISION, TORCHVISION_NOTE = import_torchvision()


# -- models: each factory returns (model, args, kwargs) ------------------------------------
Built = tuple[torch.nn.Module, tuple, dict]


def _image(size: int = 224) -> tuple:
    return (torch.randn(1, 3, size, size),)


def _vision(name: str) -> Callable[[], Built]:
    def build() -> Built:
        if TORCHVISION is None:
            raise ModuleNotFoundError(TORCHVISION_NOTE)
        if name == "deeplabv3_mobilenet_v3_large":
            factory = TORCHVISION.models.segmentation.deeplabv3_mobilenet_v3_large
            return factory(weights=None, weights_backbone=None), _image(), {}
        return getattr(TORCHVISION.models, name)(weights=None), _image(), {}

    return build


def _timm(name: str) -> Callable[[], Built]:
    def build() -> Built:
        import timm  # after import_torchvision: timm imports torchvision

        return timm.create_model(name, pretrained=False), _image(), {}

    return build


SEQ = 64
VOCAB = 1000


def _ids(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _mask(batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    """Ones with the second sequence padded: a mask that changes the result."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq // 2 :] = 0
    return mask


ENCODER = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)


def _bert() -> Built:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=128, **ENCODER))
    ids = _ids()
    return model, (), {"input_ids": ids, "attention_mask": _mask(), "token_type_ids": ids * 0}


def _distilbert() -> Built:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=256,
        n_layers=2,
        n_heads=4,
        hidden_dim=1024,
        max_position_embeddings=128,
    )
    return DistilBertModel(config), (), {"input_ids": _ids(), "attention_mask": _mask()}


def _gpt2(masked: bool) -> Callable[[], Built]:
    def build() -> Built:
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=256,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,  # the default (50256) lies outside this vocabulary
            eos_token_id=0,
            use_cache=False,
        )
        kwargs = {"input_ids": _ids()}
        if masked:
            kwargs["attention_mask"] = _mask()
        return GPT2Model(config), (), kwargs

    return build


def _t5_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB,
        d_model=256,
        d_kv=64,
        d_ff=1024,
        num_layers=2,
        num_heads=4,
        use_cache=False,
    )


def _t5_encoder() -> Built:
    from transformers import T5EncoderModel

    return T5EncoderModel(_t5_config()), (), {"input_ids": _ids(), "attention_mask": _mask()}


def _t5() -> Built:
    from transformers import T5ForConditionalGeneration

    kwargs = {"input_ids": _ids(), "attention_mask": _mask(), "decoder_input_ids": _ids(seq=16)}
    return T5ForConditionalGeneration(_t5_config()), (), kwargs


def _llama() -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
    )
    return LlamaForCausalLM(config), (), {"input_ids": _ids(), "attention_mask": _mask()}


def _whisper_encoder() -> Built:
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        vocab_size=VOCAB,
        pad_token_id=0,  # the defaults (50256-50257) lie outside this vocabulary
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        d_model=256,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=1024,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=1024,
        num_mel_bins=80,
        max_source_positions=250,  # the encoder takes exactly 2x this many frames
        max_target_positions=64,
    )
    encoder = WhisperModel(config).get_encoder()
    return encoder, (), {"input_features": torch.randn(1, 80, 500)}


def _vit() -> Built:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=224, patch_size=16, **ENCODER)
    return ViTModel(config), (), {"pixel_values": _image()[0]}


MODELS: dict[str, Callable[[], Built]] = {
    "resnet18": _vision("resnet18"),
    "mobilenet_v3_small": _vision("mobilenet_v3_small"),
    "efficientnet_b0": _vision("efficientnet_b0"),
    "convnext_tiny": _vision("convnext_tiny"),
    "vit_b_16": _vision("vit_b_16"),
    "deeplabv3_mobilenet_v3_large": _vision("deeplabv3_mobilenet_v3_large"),
    "bert": _bert,
    "distilbert": _distilbert,
    "gpt2": _gpt2(masked=False),
    "gpt2_mask": _gpt2(masked=True),
    "t5_encoder": _t5_encoder,
    "t5": _t5,
    "llama": _llama,
    "whisper_encoder": _whisper_encoder,
    "hf_vit": _vit,
    "timm_resnet18": _timm("resnet18"),
    "timm_convnext_atto": _timm("convnext_atto"),
}


# -- measuring -----------------------------------------------------------------------------
def is_plumbing(op: str) -> bool:
    """Not a kernel: a Python builtin on tuples or SymInts (no namespace), or a check."""
    return "." not in op or op in PLUMBING_OPS


def share(report: nativert.DelegationReport) -> dict[str, Any]:
    """The report's counts, the same without plumbing, regions per delegate, and the ops
    left in PyTorch ({op: {"count", "reasons": {first line: n}}}, most frequent first)."""
    kernels = {op: by for op, by in report.ops.items() if not is_plumbing(op)}
    left = {op: by["pytorch"] for op, by in report.ops.items() if by.get("pytorch")}
    reasons: dict[str, Counter[str]] = {op: Counter() for op in left}
    for op in left:
        for reason, n in report.reasons.get(op, {}).items():
            reasons[op][reason.splitlines()[0]] += n
    return {
        "compute_nodes": report.total_nodes,
        "delegated_nodes": report.delegated_nodes,
        "kernel_nodes": sum(sum(by.values()) for by in kernels.values()),
        "delegated_kernel_nodes": sum(
            n for by in kernels.values() for who, n in by.items() if who != "pytorch"
        ),
        "regions": dict(Counter(r.backend_id for r in report.regions)),
        "left_in_pytorch": {
            op: {"count": left[op], "plumbing": is_plumbing(op), "reasons": dict(reasons[op])}
            for op in sorted(left, key=lambda op: (-left[op], op))
        },
    }


def max_abs_diff(got: Any, expected: Any) -> tuple[float, float]:
    """(largest |got - expected|, largest |expected|) over the outputs' tensors; the first is
    inf when the structures, shapes or dtypes differ."""
    got_leaves = pytree.tree_leaves(got)
    want_leaves = pytree.tree_leaves(expected)
    if len(got_leaves) != len(want_leaves):
        return float("inf"), 0.0
    worst = scale = 0.0
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if not isinstance(w, torch.Tensor):
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            return float("inf"), 0.0
        if w.numel():
            worst = max(worst, float((g.double() - w.double()).abs().max()))
            scale = max(scale, float(w.double().abs().max()))
    return worst, scale


def _randomize_zero_weights(model: torch.nn.Module) -> None:
    """Some heads start at zero (torchvision's ViT): random values, or every output is 0 and
    the comparison with eager says nothing."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)


def _diff(diff: float, scale: float) -> str:
    return f"{diff:.1e} ({diff / scale:.0e} rel)" if scale else f"{diff:.1e}"


def _compiled_share(
    model: torch.nn.Module, args: tuple, kwargs: dict, expected: Any
) -> dict[str, Any]:
    """torch.compile(backend="nativert")'s counts, summed over the Dynamo graphs it built."""
    torch._dynamo.reset()
    seen = len(nativert.compile_reports())
    compiled = torch.compile(model, backend="nativert", options={"cache_dir": None})
    start = time.perf_counter()
    got = compiled(*args, **kwargs)
    diff, scale = max_abs_diff(got, expected)
    seconds = time.perf_counter() - start
    graphs = [g for r in nativert.compile_reports()[seen:] for g in r.graphs]
    shares = [share(g.report) for g in graphs]
    total = {
        key: sum(s[key] for s in shares)
        for key in ("compute_nodes", "delegated_nodes", "kernel_nodes", "delegated_kernel_nodes")
    }
    left: Counter[str] = Counter()
    for s in shares:
        left.update({op: v["count"] for op, v in s["left_in_pytorch"].items()})
    return {
        **total,
        "graphs": len(graphs),
        "seconds": round(seconds, 2),
        "max_abs_diff": diff,
        "output_scale": scale,
        "fallbacks": [f.splitlines()[0] for g in graphs for f in g.fallbacks],
        "left_in_pytorch": dict(left.most_common()),
    }


def _failure(stage: str, exc: BaseException) -> str:
    """'stage: Type: first line (cause: Type: first line) [at file:line function]': the root
    cause when there is one, located at its innermost nativert frame (else its innermost)."""

    def line(e: BaseException) -> str:
        return f"{type(e).__name__}: {first_line(e)[:200]}"

    root = exc
    while True:
        if isinstance(root, torch._dynamo.exc.BackendCompilerFailed):
            root = root.inner_exception  # raised `from None`: no __cause__
        elif root.__cause__ is not None:
            root = root.__cause__
        else:
            break
    text = line(exc) if root is exc else f"{line(exc)} (cause: {line(root)})"
    frames = traceback.extract_tb(root.__traceback__)
    ours = [f for f in frames if "/nativert/" in f.filename] or frames
    if ours:
        frame = ours[-1]
        text += f" [at {frame.filename.split('/nativert/')[-1]}:{frame.lineno} {frame.name}]"
    return f"{stage}: {text}"


def measure(name: str, compile_too: bool) -> dict[str, Any]:
    try:
        torch.manual_seed(0)
        model, args, kwargs = MODELS[name]()
    except ModuleNotFoundError as exc:
        return {"error": f"skipped: {first_line(exc)}"}
    except Exception as exc:  # recorded, not hidden: the table shows it
        return {"error": _failure("build", exc)}
    model.eval()
    _randomize_zero_weights(model)
    result: dict[str, Any] = {}
    stage = "eager"
    with torch.no_grad():
        try:
            expected = model(*args, **kwargs)
            stage = "export"
            start = time.perf_counter()
            program = torch.export.export(model, args, kwargs)
            result["export_s"] = round(time.perf_counter() - start, 2)
            stage = "lower"
            lowered = lower_program(program, nativert.Settings(cache_dir=None))
            result["lower_s"] = round(lowered.seconds, 2)
            result["fallbacks"] = [f.splitlines()[0] for f in lowered.fallbacks]
            result.update(share(nativert.delegation_report(lowered.program)))
            stage = "executor"
            got = nativert.Executor(lowered.program)(*args, **kwargs)
            result["max_abs_diff"], result["output_scale"] = max_abs_diff(got, expected)
        except Exception as exc:
            result["error"] = _failure(stage, exc)
        if compile_too and stage != "eager":
            try:
                result["compile"] = _compiled_share(model, args, kwargs, expected)
            except Exception as exc:
                result["compile"] = {"error": _failure("compile", exc)}
    return result


# -- the report ----------------------------------------------------------------------------
def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _compile_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    if "error" in c:
        return f"**failed** {c['error']}"
    return (
        f"{c['graphs']}, {_pct(c['delegated_nodes'], c['compute_nodes'])} "
        f"({_pct(c['delegated_kernel_nodes'], c['kernel_nodes'])}), "
        + _diff(c["max_abs_diff"], c["output_scale"])
    )


def table(results: dict[str, dict], compile_too: bool) -> list[str]:
    head = (
        "| model | compute nodes | delegated | % | kernels (no plumbing) | delegated | % "
        "| regions | export s | lower s | max abs diff | top ops left in PyTorch |"
    )
    if compile_too:
        head += " compile: graphs, delegated % (of kernels), max abs diff |"
    columns = head.count("|") - 1
    lines = [head, "|---" * columns + "|"]
    for name, r in results.items():
        if "compute_nodes" in r:
            regions = ", ".join(f"{b} x{n}" for b, n in sorted(r["regions"].items())) or "none"
            left = [(op, v) for op, v in r["left_in_pytorch"].items() if not v["plumbing"]]
            cells = [
                name,
                str(r["compute_nodes"]),
                str(r["delegated_nodes"]),
                _pct(r["delegated_nodes"], r["compute_nodes"]),
                str(r["kernel_nodes"]),
                str(r["delegated_kernel_nodes"]),
                _pct(r["delegated_kernel_nodes"], r["kernel_nodes"]),
                regions,
                f"{r['export_s']:.1f}",
                f"{r['lower_s']:.1f}",
                _diff(r["max_abs_diff"], r["output_scale"]) if "max_abs_diff" in r else "-",
                ", ".join(f"{op} x{v['count']}" for op, v in left[:3]) or "-",
            ]
        else:
            cells = [name, *[""] * 10, ""]
        if "error" in r:
            failed = "" if r["error"].startswith("skipped") else "**failed** "
            cells[11] = (cells[11] + " " if cells[11] else "") + failed + r["error"]
        if compile_too:
            cells.append(_compile_cell(r.get("compile")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def left_in_pytorch(results: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in results.items():
        compiled = r.get("compile", {})
        keys = ("left_in_pytorch", "fallbacks")
        if not any(r.get(k) or compiled.get(k) for k in keys):
            continue
        lines.append(f"- **{name}**")
        for op, v in r.get("left_in_pytorch", {}).items():
            why = "; ".join(f"{reason} (x{n})" for reason, n in v["reasons"].items())
            lines.append(f"  - `{op}` x{v['count']}{' (plumbing)' if v['plumbing'] else ''}: {why}")
        for fallback in r.get("fallbacks", []):
            lines.append(f"  - region fell back: {fallback}")
        if compiled.get("left_in_pytorch"):
            ops = ", ".join(f"`{op}` x{n}" for op, n in compiled["left_in_pytorch"].items())
            lines.append(f"  - torch.compile path, left in PyTorch: {ops}")
        for fallback in compiled.get("fallbacks", []):
            lines.append(f"  - torch.compile path, region fell back: {fallback}")
    return lines


def _without_note(argv: list[str]) -> list[str]:
    if "--note" in argv:
        i = argv.index("--note")
        return argv[:i] + argv[i + 2 :]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--markdown", help="write the tables as markdown to this path")
    parser.add_argument(
        "--compile", action="store_true", help='also measure torch.compile(backend="nativert")'
    )
    parser.add_argument("--note", default="", help="recorded with the results (e.g. the commit)")
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    results = {}
    for name in names:
        print(f"-- {name}", flush=True)
        results[name] = measure(name, args.compile)
        print(f"   {results[name]}", flush=True)
    import onnxruntime

    timm_note = (
        f"timm {__import__('timm').__version__}"
        if importlib.util.find_spec("timm")
        else "timm is not installed"
    )
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/real_models.py", *_without_note(sys.argv[1:])]),
        "note": args.note,
        "machine": machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": __import__("transformers").__version__,
        "torchvision": TORCHVISION_NOTE,
        "timm": timm_note,
        "default_delegates": [d.backend_id for d in default_delegates()],
        "models": results,
    }
    lines = [
        f"# Delegated share of real architectures ({report['date']})",
        "",
        f"`{report['command']}` on {report['machine']}; torch {report['torch']}, onnxruntime "
        f"{report['onnxruntime']}, transformers {report['transformers']}, "
        f"{report['torchvision']}, {timm_note}. Random weights, eval mode, default settings "
        f"(delegates {', '.join(report['default_delegates'])}; payload cache off). Compute "
        "nodes: every call_function node, the delegation report's rule; kernels: the same "
        "without plumbing (getitem, SymInt arithmetic, sym_size, runtime asserts)."
        + (f" {args.note}" if args.note else ""),
        "",
        *table(results, args.compile),
        "",
        "Ops left in PyTorch (count, then the partitioner's reasons):",
        "",
        *left_in_pytorch(results),
    ]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

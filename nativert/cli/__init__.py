"""`nativert` command line: demo, lower, inspect, bench, serve."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from nativert.cli.demo import demo
from nativert.cli.errors import CliError
from nativert.cli.lower import add_settings_flags, lower, settings_from_args
from nativert.cli.package import bench, inspect
from nativert.cli.serve import serve, update_weights

__all__ = ["CliError", "add_settings_flags", "main", "settings_from_args"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-native-code",
        action="store_true",
        help="load aoti/tensorrt segments: their payloads are native code that runs on load",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nativert", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="lower the built-in models and check them against eager")
    p = commands.add_parser("lower", help="export, lower and save a model from a factory")
    p.add_argument("factory", help="FILE.py:FACTORY; FACTORY() returns (model, example_args)")
    p.add_argument("-o", "--output", required=True, help="the .pt2 file to write")
    p.add_argument("--dynamic-batch", action="store_true", help="dim 0 of every input dynamic")
    p.add_argument(
        "--int8",
        action="store_true",
        help="quantize to int8 first (nativert.quantize, PT2E; needs nativert[quant])",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="with --int8: calibration inputs, a .safetensors or .pt file of tensors named "
        "arg0, arg1, ... (one per positional input), each [N, *example shape] for N batches "
        "(default: 8 random batches, with a warning)",
    )
    p.add_argument("--scheme", default="x86", help="with --int8: x86 (default) or x86_reduce_range")
    add_settings_flags(p)
    p = commands.add_parser("inspect", help="what a saved package holds")
    p.add_argument("package")
    _add_trust_flag(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = commands.add_parser("bench", help="latency and throughput of a package's Executor")
    p.add_argument("package")
    _add_trust_flag(p)
    p.add_argument("--threads", type=_positive, default=1)
    p.add_argument("--runs", type=_positive, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--size", type=_positive, default=4, help="size of dynamic dims")
    p.add_argument("--profile", action="store_true", help="also the per-node profile")
    p = commands.add_parser(
        "serve",
        help="serve a package over HTTP on Ray Serve ('serve update-weights URL FILE' swaps "
        "its weights)",
    )
    p.add_argument("package")
    _add_trust_flag(p)
    p.add_argument("--replicas", type=_positive, default=1)
    p.add_argument("--max-batch-size", type=_positive, default=8, help="1: no batching")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=_positive, default=1, help="concurrent calls per replica")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p = commands.add_parser("serve-update-weights", help=argparse.SUPPRESS)
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("weights", help="a .safetensors file of new weights")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="a partial update")
    p.add_argument("--timeout", type=float, default=300.0)
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is not None and argv[at : at + 2] == ["serve", "update-weights"]:
        argv[at : at + 2] = ["serve-update-weights"]
    args = parser.parse_args(argv)
    # torch 2.13's own run_decompositions deep-copies pytree specs through a deprecated
    # LeafSpec check and warns on every export; it says nothing about the user's model.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    run = {
        "demo": demo,
        "lower": lower,
        "inspect": inspect,
        "bench": bench,
        "serve": serve,
        "serve-update-weights": update_weights,
    }[args.command]
    try:
        return run(args)
    except BrokenPipeError:  # `nativert inspect x.pt2 --json | head`: the reader left
        sys.stderr.close()
        return 0
    except Exception as exc:
        if args.debug:
            raise
        what = str(exc) if isinstance(exc, CliError) else f"{type(exc).__name__}: {exc}"
        lines = what.strip().splitlines() or [type(exc).__name__]
        command = args.command.replace("serve-", "serve ", 1)
        print(f"nativert {command}: error: {lines[0]}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

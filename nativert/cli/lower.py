"""`nativert lower`: export a model from a user factory, lower it with the settings flags
(one per nativert.Settings field, generated from its metadata) and save the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from nativert.cli.errors import CliError


def _load_factory(spec: str):
    """FILE.py:FACTORY -> the factory function (the file imported as a module)."""
    import importlib.util
    import os

    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise CliError(f"{spec!r}: expected FILE.py:FACTORY, e.g. models.py:make_model")
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    module_name = f"nativert_user_{os.path.splitext(os.path.basename(path))[0]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise CliError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # its sibling imports
    try:
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise CliError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CliError(f"{path} has no function {name!r}")
    return factory


def _model_and_args(factory, spec: str) -> tuple[torch.nn.Module, tuple, dict[str, Any]]:
    """FACTORY() -> (model, example_args, example_kwargs); the factory returns
    (model, args) or (model, args, kwargs), a lone tensor standing for (tensor,)."""
    try:
        made = factory()
    except Exception as exc:
        raise CliError(f"{spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not (
        isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module)
    ):
        got = type(made).__name__
        if isinstance(made, tuple):
            got = f"({', '.join(type(item).__name__ for item in made)})"
        raise CliError(
            f"{spec}: the factory must return (model, example_args) or "
            f"(model, example_args, example_kwargs) with model a torch.nn.Module, got {got}"
        )
    model, example = made[:2]
    kwargs = made[2] if len(made) == 3 else {}
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, tuple):
        raise CliError(f"{spec}: example_args must be a tuple, got {type(example).__name__}")
    if not isinstance(kwargs, dict):
        raise CliError(f"{spec}: example_kwargs must be a dict, got {type(kwargs).__name__}")
    names = [name for name in kwargs if not isinstance(name, str)]
    if names:
        raise CliError(f"{spec}: example_kwargs keys must be argument names, got {names[0]!r}")
    return model, example, kwargs


def _dynamic_batch(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], spec: str):
    """(args, kwargs, dynamic_shapes) with dim 0 of every top-level tensor input whose dim 0
    is the batch (the first such tensor's) one dynamic `batch` dim. An example batch of 1
    becomes a batch-2 copy: export specializes a dim whose example size is 1."""
    import inspect

    inputs = [*args, *kwargs.values()]
    first = next((v for v in inputs if isinstance(v, torch.Tensor) and v.dim()), None)
    if first is None:
        raise CliError(f"{spec}: --dynamic-batch needs a tensor input with a dim 0")
    size = first.shape[0]

    def is_batched(value: Any, size: int) -> bool:
        return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size

    if size == 1:
        print("example batch is 1; exporting with a batch-2 copy so the batch dim stays dynamic")

        def grow(value: Any) -> Any:
            if is_batched(value, 1):
                return value.repeat(2, *([1] * (value.dim() - 1)))
            return value

        args = tuple(grow(a) for a in args)
        kwargs = {name: grow(v) for name, v in kwargs.items()}
        size = 2
    batch = torch.export.Dim("batch")

    def shape_of(value: Any) -> Any:
        return {0: batch} if is_batched(value, size) else None

    # Keyed by forward's parameter names: the one dynamic_shapes form that covers kwargs.
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise CliError(
            f"{spec}: the example inputs do not fit {type(model).__name__}.forward: {exc}"
        ) from exc
    dynamic: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            dynamic[name] = tuple(shape_of(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            dynamic[name] = {k: shape_of(v) for k, v in value.items()}
        else:
            dynamic[name] = shape_of(value)
    return args, kwargs, dynamic


def _export_error(exc: Exception, spec: str) -> CliError:
    """One line (the CLI prints only the first): torch's reasons and suggested fixes for a
    constraint violation, the first line of the message otherwise."""
    text = str(exc).strip()
    lines = text.splitlines()
    head = lines[0] if lines else ""
    if "Constraints violated" in head:
        # "  - You marked batch as dynamic but your code specialized it to be a constant (4).
        # If you're using mark_dynamic, ..." : the first sentence is the reason; the advice
        # after it is about torch's Python API, not this command.
        reasons = [
            line.strip()[2:].split(". ")[0].rstrip(".")
            for line in lines
            if line.strip().startswith("- ")
        ]
        fixes: list[str] = []
        if "Suggested fixes:" in lines:
            for line in lines[lines.index("Suggested fixes:") + 1 :]:
                if not line.strip():
                    break
                fixes.append(line.strip())
        detail = "; ".join(reasons) or head
        if fixes:
            detail += f" (suggested fixes: {', '.join(fixes)})"
        return CliError(
            f"torch.export could not keep the batch dim of {spec} dynamic: {detail}; "
            "lower it without --dynamic-batch for a fixed batch size"
        )
    return CliError(f"torch.export failed for {spec}: {type(exc).__name__}: {head}")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per nativert.Settings field, from the field's `cli` metadata."""
    import dataclasses

    from nativert.settings import Settings

    group = parser.add_argument_group("settings (nativert.Settings)")
    for field in dataclasses.fields(Settings):
        cli, help_ = field.metadata["cli"], field.metadata["help"]
        common = dict(dest=field.name, default=argparse.SUPPRESS, help=help_)
        if cli.kind == "bool":
            group.add_argument(cli.flag, action=argparse.BooleanOptionalAction, **common)
        elif cli.kind == "spec":
            group.add_argument(cli.flag, action="append", metavar=cli.metavar, **common)
        else:
            parse = {
                "list": _comma_list,
                "int": int,
                "float": float,
                "str": str,
                "path": _path_or_none,
            }
            parse = parse[cli.kind]
            group.add_argument(cli.flag, type=parse, metavar=cli.metavar, **common)


def _comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _path_or_none(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _compile_specs(entries: Sequence[str]) -> dict[str, dict[str, Any]]:
    """DELEGATE.KEY=VALUE strings -> {delegate: {key: value}} (values read as JSON if they
    parse: 1, true, "x", [..]; otherwise kept as strings)."""
    import json

    specs: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name, sep, text = entry.partition("=")
        backend_id, dot, key = name.partition(".")
        if not sep or not dot or not backend_id or not key:
            raise CliError(f"--compile-spec {entry!r}: expected DELEGATE.KEY=VALUE")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        specs.setdefault(backend_id, {})[key] = value
    return specs


def settings_from_args(args: argparse.Namespace, base: Any) -> Any:
    """`base` (a Settings) with every settings flag the user gave."""
    import dataclasses

    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(base) if hasattr(args, f.name)
    }
    if "compile_specs" in given:
        given["compile_specs"] = _compile_specs(given["compile_specs"])
    return base.replace(**given)


def _calibration_batches(path: str | None, example: tuple) -> list[tuple]:
    """The calibration batches from FILE (see the --calibration help), or 8 random ones
    shaped like the example inputs, with a warning."""
    if path is None:
        print(
            "warning: --int8 without --calibration calibrates on 8 random batches shaped like "
            "the example inputs; real inputs give better scales (--calibration FILE)",
            file=sys.stderr,
        )
        return [
            tuple(torch.randn_like(x) if x.is_floating_point() else x for x in example)
            for _ in range(8)
        ]
    import os

    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:  # weights_only: plain tensors, never code
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CliError(f"{path}: cannot read calibration inputs: {exc}") from exc
    names = [f"arg{i}" for i in range(len(example))]
    if not isinstance(tensors, dict) or sorted(tensors) != sorted(names):
        got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise CliError(f"{path}: expected tensors named {names}, got {got}")
    counts = set()
    for name, x in zip(names, example, strict=True):
        value = tensors[name]
        if not isinstance(value, torch.Tensor) or list(value.shape[1:]) != list(x.shape):
            shape = list(getattr(value, "shape", []))
            raise CliError(
                f"{path}: {name} is {shape}; expected [N, {', '.join(map(str, x.shape))}] "
                "(N calibration batches shaped like the example input)"
            )
        counts.add(value.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise CliError(f"{path}: every argN needs the same number of batches, got {counts}")
    return [tuple(tensors[n][i] for n in names) for i in range(counts.pop())]


def _quantized(program, model, example, kwargs, args):
    import nativert

    if kwargs:
        raise CliError("--int8 takes models with positional example inputs only")
    batches = _calibration_batches(args.calibration, example)
    try:
        quantized = nativert.quantize(program, batches, scheme=args.scheme)
    except (ValueError, TypeError, nativert.NativertError) as exc:
        raise CliError(f"--int8: {exc}") from exc
    with torch.no_grad():
        expected, got = model(*example), quantized.module()(*example)
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        error = (got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
        print(f"quantized to int8 ({args.scheme}): rel err {float(error):.2g} vs fp32 eager")
    return quantized


def lower(args: argparse.Namespace) -> int:
    import os

    import nativert

    factory = _load_factory(args.factory)
    model, example, kwargs = _model_and_args(factory, args.factory)
    dynamic = None
    if args.dynamic_batch:
        example, kwargs, dynamic = _dynamic_batch(model, example, kwargs, args.factory)
    if args.calibration and not args.int8:
        raise CliError("--calibration is for --int8: add --int8, or drop --calibration")
    try:
        program = torch.export.export(model.eval(), example, kwargs=kwargs, dynamic_shapes=dynamic)
    except Exception as exc:
        raise _export_error(exc, args.factory) from exc
    if args.int8:
        program = _quantized(program, model, example, kwargs, args)
    from nativert.backend import pipeline

    settings = settings_from_args(args, nativert.Settings())
    result = pipeline.lower_program(program, settings)
    delegated = result.program
    if result.tuning is not None:
        print(result.tuning)
    print(nativert.delegation_report(delegated))
    nativert.save(delegated, args.output)
    print(f"saved {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB)")
    return 0

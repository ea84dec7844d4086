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


def _model_and_args(factory, spec: str):
    try:
        made = factory()
    except Exception as exc:
        raise CliError(f"{spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise CliError(
            f"{spec}: the factory must return (model, example_args), got {type(made).__name__}"
        )
    model, example = made
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, tuple):
        raise CliError(f"{spec}: example_args must be a tuple, got {type(example).__name__}")
    return model, example


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
            parse = {"list": _comma_list, "int": int, "float": float, "path": _path_or_none}
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


def lower(args: argparse.Namespace) -> int:
    import os

    import nativert

    factory = _load_factory(args.factory)
    model, example = _model_and_args(factory, args.factory)
    dynamic = None
    if args.dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = tuple(
            {0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in example
        )
    try:
        program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CliError(
            f"torch.export failed for {args.factory}: {type(exc).__name__}: {first}"
        ) from exc
    from nativert.backend import pipeline

    settings = settings_from_args(args, nativert.Settings(progress=True))
    result = pipeline.lower_program(program, settings)
    delegated = result.program
    if result.tuning is not None:
        print(result.tuning)
    print(nativert.delegation_report(delegated))
    nativert.save(delegated, args.output)
    print(f"saved {args.output} ({os.path.getsize(args.output) / 1e6:.2f} MB)")
    return 0

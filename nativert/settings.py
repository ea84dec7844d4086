"""One settings object for every entry point: `to_backend`, `torch.compile` and the CLI.

`Settings` is a frozen dataclass: every option, its default and its check live here, once.
`to_backend(ep, **options)` and `torch.compile(..., options={...})` take its field names;
`nativert lower` has one flag per field, generated from each field's `cli` metadata (a test
walks the three surfaces, so a new field cannot be missing from one of them). Values are
validated on construction, and an error names the setting and says what it takes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from nativert.delegate.contract import (
    FP32,
    INT8,
    PRECISION_SPEC,
    PRECISIONS,
    CompileSpec,
    Delegate,
    dict_to_specs,
)
from nativert.delegate.registry import get_delegate, list_delegates
from nativert.errors import SettingsError, UnknownDelegateError

DEFAULT_CACHE = "default"  # $NATIVERT_CACHE_DIR, else ~/.cache/nativert

OpLike = torch._ops.OpOverload | torch._ops.OpOverloadPacket | str


@dataclasses.dataclass(frozen=True)
class Cli:
    """How a setting is spelled on the command line (`nativert lower`).

    kind: "list" (comma-separated), "int", "float", "str", "bool" (--x / --no-x), "path"
    ("none": None) or "spec" (repeatable DELEGATE.KEY=VALUE, the value read as JSON when it parses).
    """

    flag: str
    kind: str
    metavar: str | None = None


def _setting(default: Any = None, *, help: str, cli: Cli, factory: Any = None) -> Any:
    meta = {"help": help, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def normalize_op(op: OpLike) -> str:
    """'namespace::name' (any overload matches) or a full overload name ('aten::add.Tensor')."""
    if isinstance(op, torch._ops.OpOverload):
        return op.name()
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, str) and "::" in op:
        return op
    raise SettingsError(f"ops are OpOverloads or 'namespace::name' strings, got {op!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every nativert option, with its default. Construct with keywords; invalid values
    raise SettingsError (or UnknownDelegateError for a backend id nobody registered)."""

    delegates: tuple[str, ...] | None = _setting(
        help="backend ids in priority order (default: every available fast delegate)",
        cli=Cli("--delegates", "list", "A,B"),
    )
    min_block_size: int = _setting(
        1,
        help="regions with fewer compute nodes stay in PyTorch",
        cli=Cli("--min-block-size", "int", "N"),
    )
    exclude_ops: tuple[str, ...] = _setting(
        (),
        help="ops ('aten::relu' or OpOverloads) that always stay in PyTorch",
        cli=Cli("--exclude-ops", "list", "OP,OP"),
    )
    allow_single_node_ops: tuple[str, ...] = _setting(
        (),
        help="ops whose regions are kept even below min_block_size",
        cli=Cli("--allow-single-node-ops", "list", "OP,OP"),
    )
    compile_specs: Mapping[str, Mapping[str, Any]] = _setting(
        help="per delegate, its compile options: {backend_id: {key: value}}",
        cli=Cli("--compile-spec", "spec", "DELEGATE.KEY=VALUE"),
        factory=dict,
    )
    num_threads: int | None = _setting(
        help="intra-op threads of each delegate that takes a thread count (default: torch's)",
        cli=Cli("--num-threads", "int", "N"),
    )
    strict: bool = _setting(
        False,
        help="a region that fails to compile raises instead of staying in PyTorch",
        cli=Cli("--strict", "bool"),
    )
    cache_dir: str | None = _setting(
        DEFAULT_CACHE,
        help="payload cache ('default': $NATIVERT_CACHE_DIR or ~/.cache/nativert; None: off)",
        cli=Cli("--cache-dir", "path", "DIR|none"),
    )
    progress: bool | None = _setting(
        None,
        help="show a progress bar over the regions as they compile, on stderr (default: "
        "when stderr is a terminal)",
        cli=Cli("--progress", "bool"),
    )
    autotune: bool = _setting(
        False,
        help="choose each region's runner (every delegate that takes all of it, or PyTorch) "
        "by timing them on the example inputs; decisions are cached in cache_dir",
        cli=Cli("--autotune", "bool"),
    )
    autotune_budget_s: float = _setting(
        300.0,
        help="seconds autotune may spend compiling and timing candidates; past it, the "
        "remaining regions keep the default choice",
        cli=Cli("--autotune-budget-s", "float", "SECONDS"),
    )
    compare_with_pytorch: bool = _setting(
        True,
        help="time the delegated program against PyTorch alone on the example inputs and keep "
        "the faster (torch.compile: every graph, forward and backward when training; lowering: "
        "a program that leaves compute in PyTorch or runs several regions)",
        cli=Cli("--compare-with-pytorch", "bool"),
    )
    precision: str = _setting(
        FP32,
        help="what delegates may compute in: 'fp32' (exact, the default), 'bf16' or 'fp16' "
        "where a delegate offers it and the region stays within `accuracy`; program inputs "
        "and outputs keep their dtypes",
        cli=Cli("--precision", "str", "fp32|bf16|fp16"),
    )
    accuracy: float = _setting(
        1e-2,
        help="the largest relative error a region lowered below fp32 may have against fp32 "
        "PyTorch on the example inputs (max |error| / max |fp32 output|); a region over it "
        "is lowered in fp32, with a warning",
        cli=Cli("--accuracy", "float", "RELATIVE_ERROR"),
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "delegates", _delegates(self.delegates))
        _int(self.min_block_size, "min_block_size", minimum=1)
        for name in ("exclude_ops", "allow_single_node_ops"):
            set_(self, name, _ops(getattr(self, name), name))
        set_(self, "compile_specs", _compile_specs(self.compile_specs))
        if self.num_threads is not None:
            _int(self.num_threads, "num_threads", minimum=1)
        for name in ("strict", "progress", "autotune", "compare_with_pytorch"):
            if name == "progress" and self.progress is None:
                continue
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(
                    f"setting {name} must be True or False, got {getattr(self, name)!r}"
                )
        cache_dir = self.cache_dir
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise SettingsError(
                f"setting cache_dir must be a path, {DEFAULT_CACHE!r} or None (no cache), "
                f"got {cache_dir!r}"
            )
        set_(self, "cache_dir", None if cache_dir is None else os.fspath(cache_dir))
        budget = self.autotune_budget_s
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise SettingsError(f"setting autotune_budget_s must be a number > 0, got {budget!r}")
        set_(self, "autotune_budget_s", float(budget))
        accuracy = self.accuracy
        if (
            isinstance(accuracy, bool)
            or not isinstance(accuracy, (int, float))
            or not (0 <= accuracy < float("inf"))
        ):
            raise SettingsError(
                f"setting accuracy must be a relative error >= 0 (e.g. 1e-2), got {accuracy!r}"
            )
        set_(self, "accuracy", float(accuracy))
        _precision(self.precision, self.delegates)

    @property
    def show_progress(self) -> bool:
        """`progress`, or when it is None (the default) whether stderr is a terminal."""
        if self.progress is not None:
            return self.progress
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Settings | Mapping[str, Any] | None = None, **more: Any):
        """Settings from a dict of options (torch.compile's `options=`) and/or keywords;
        unknown names raise an error that lists the valid ones."""
        if isinstance(options, Settings):
            return dataclasses.replace(options, **_known(more)) if more else options
        if options is not None and not isinstance(options, Mapping):
            raise SettingsError(
                f"nativert options must be a dict of settings, got {type(options).__name__}"
            )
        return cls(**_known({**(options or {}), **more}))

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **_known(changes))

    def specs_for(
        self, delegate: Delegate, precision: str | None = None
    ) -> tuple[CompileSpec, ...]:
        """The compile specs a delegate gets: its entry in `compile_specs`, plus
        `num_threads` under the delegate's `thread_spec` key and `precision` (default: the
        setting; "int8" for a quantized region) under PRECISION_SPEC where the delegate
        offers it, unless set there."""
        precision = self.precision if precision is None else precision
        specs = dict(self.compile_specs.get(delegate.backend_id, {}))
        if self.num_threads is not None and delegate.thread_spec is not None:
            specs.setdefault(delegate.thread_spec, self.num_threads)
        if precision != FP32 and precision in delegate.precisions():
            specs.setdefault(PRECISION_SPEC, precision)
        return tuple(dict_to_specs(specs))


def _known(options: Mapping[str, Any]) -> dict[str, Any]:
    valid = Settings.names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise SettingsError(f"unknown nativert setting(s) {unknown}; valid settings: {valid}")
    return dict(options)


def _int(value: Any, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"setting {name} must be an int >= {minimum}, got {value!r}")


def _delegates(delegates: Any) -> tuple[str, ...] | None:
    if delegates is None:
        return None
    # A dict or a set would be iterable, but has no priority order to give.
    unordered = isinstance(delegates, (Mapping, set, frozenset))
    if isinstance(delegates, str) or unordered or not isinstance(delegates, Iterable):
        raise SettingsError(
            f"setting delegates must be a list of backend ids in priority order, got "
            f"{delegates!r}" + (f"; write [{delegates!r}]" if isinstance(delegates, str) else "")
        )
    delegates = tuple(delegates)
    for backend_id in delegates:
        if not isinstance(backend_id, str):
            raise SettingsError(f"setting delegates holds {backend_id!r}, not a backend id")
        try:
            get_delegate(backend_id)
        except UnknownDelegateError as exc:
            raise UnknownDelegateError(f"setting delegates: {exc}") from None
    if len(set(delegates)) != len(delegates):
        raise SettingsError(f"setting delegates names a delegate twice: {list(delegates)}")
    return delegates


def _precision(precision: Any, delegates: tuple[str, ...] | None) -> None:
    """A known precision that some delegate (of those named, else of those available)
    offers on this machine; else a SettingsError saying what each one offers."""
    if precision == FP32:
        return
    if precision == INT8:
        raise SettingsError(
            "setting precision='int8' does not exist: int8 comes from the program. Quantize "
            "it with nativert.quantize(model, calibration_inputs) (PT2E); the regions of a "
            "quantized program run on their delegates' int8 kernels"
        )
    ids = delegates if delegates is not None else list_delegates(available_only=True)
    offered = {b: get_delegate(b).precisions() for b in ids}
    if precision in PRECISIONS and any(precision in p for p in offered.values()):
        return
    each = "; ".join(
        f"{b}: {', '.join(q for q in p if q in PRECISIONS)}" for b, p in offered.items()
    )
    what = "unknown" if precision not in PRECISIONS else "not offered here"
    raise SettingsError(
        f"setting precision={precision!r} is {what}: precisions are {list(PRECISIONS)}, and "
        f"the {'named' if delegates is not None else 'available'} delegates offer {each}"
    )


def _ops(ops: Any, name: str) -> tuple[str, ...]:
    if isinstance(ops, (str, torch._ops.OpOverload)) or not isinstance(ops, Iterable):
        raise SettingsError(f"setting {name} must be a list of ops, got {ops!r}; write [{ops!r}]")
    try:
        return tuple(normalize_op(op) for op in ops)
    except SettingsError as exc:
        raise SettingsError(f"setting {name}: {exc}") from None


def _compile_specs(specs: Any) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(specs, Mapping):
        raise SettingsError(
            f"setting compile_specs must be a dict {{backend_id: {{key: value}}}}, got {specs!r}"
        )
    frozen = {}
    for backend_id, options in specs.items():
        where = f"setting compile_specs[{backend_id!r}]"
        try:
            delegate = get_delegate(backend_id)
        except UnknownDelegateError as exc:
            raise UnknownDelegateError(f"{where}: {exc}") from None
        if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
            raise SettingsError(f"{where} must be a dict of named options, got {options!r}")
        try:
            json.dumps(dict(options))
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{where}: values must be JSON data ({exc})") from None
        try:
            delegate.check_compile_specs(options)
        except ValueError as exc:
            raise SettingsError(f"{where}: {exc}") from None
        frozen[backend_id] = types.MappingProxyType(dict(options))
    return types.MappingProxyType(frozen)

"""The pass manager: run an explicit, ordered list of passes, timed, optionally verified.

With `verify=True`, after every pass the graph is linted, the ExportedProgram verifier runs,
and, when example inputs are given, outputs are compared with the program before the first
pass. A failing pass is named together with the passes that ran before it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.export import ExportedProgram

from nativert.errors import NativertError
from nativert.passes.pass_result import PassResult

Pass = Callable[[ExportedProgram], PassResult]


class PassError(NativertError):
    """A pass raised, or broke the program it was given."""


@dataclasses.dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    modified: bool


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    program: ExportedProgram
    records: tuple[PassRecord, ...]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def __str__(self) -> str:
        rows = [
            f"  {r.name:<36} {r.seconds * 1e3:8.1f} ms  {'modified' if r.modified else '-'}"
            for r in self.records
        ]
        return "\n".join(["passes:", *rows])


def pass_name(entry: Pass | tuple[str, Pass]) -> str:
    if isinstance(entry, tuple):
        return entry[0]
    inner = getattr(entry, "func", entry)  # functools.partial
    return getattr(inner, "__name__", repr(entry))


def _run_program(program: ExportedProgram, inputs: Sequence[Any]) -> Any:
    if program.graph_signature.buffers_to_mutate or program.graph_signature.user_inputs_to_mutate:
        program = copy.deepcopy(program)  # a spot check must not advance the caller's state
        inputs = copy.deepcopy(list(inputs))
    with torch.no_grad():
        return program.module()(*inputs)


def run_passes(
    program: ExportedProgram,
    passes: Sequence[Pass | tuple[str, Pass]],
    *,
    verify: bool = False,
    example_inputs: Sequence[Any] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> PipelineResult:
    """Run `passes` in order. Entries are pass functions or (name, pass) pairs."""
    expected = None
    if verify and example_inputs is not None:
        expected = _run_program(program, example_inputs)
    records: list[PassRecord] = []
    for entry in passes:
        name = pass_name(entry)
        fn = entry[1] if isinstance(entry, tuple) else entry
        ran = [r.name for r in records]
        start = time.perf_counter()
        try:
            result = fn(program)
        except Exception as exc:
            raise PassError(
                f"pass {name!r} failed after {ran or 'no other passes'}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(result, PassResult):
            raise PassError(f"pass {name!r} returned {type(result).__name__}, not PassResult")
        records.append(PassRecord(name, time.perf_counter() - start, result.modified))
        program = result.program
        if verify:
            _verify(program, name, ran, expected, example_inputs, atol, rtol)
    return PipelineResult(program, tuple(records))


def _verify(program, name, ran, expected, example_inputs, atol, rtol) -> None:
    where = f"after pass {name!r} (which ran after {ran or 'no other passes'})"
    try:
        program.graph_module.graph.lint()
        program.validate()
    except Exception as exc:
        raise PassError(f"invalid program {where}: {type(exc).__name__}: {exc}") from exc
    if expected is None:
        return
    got = _run_program(program, example_inputs)
    flat_got = torch.utils._pytree.tree_leaves(got)
    flat_expected = torch.utils._pytree.tree_leaves(expected)
    for i, (g, e) in enumerate(zip(flat_got, flat_expected, strict=True)):
        if g.shape != e.shape or g.dtype != e.dtype:
            raise PassError(
                f"output {i} changed {where}: {tuple(g.shape)} {g.dtype}, was "
                f"{tuple(e.shape)} {e.dtype}"
            )
        if not torch.allclose(g, e, atol=atol, rtol=rtol):
            err = (g - e).abs().max().item()
            raise PassError(f"output {i} changed {where}: max abs error {err:.3e}")

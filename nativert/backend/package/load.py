"""`nativert.load`: a program saved by `nativert.save`, with every delegate restored.

A package from somewhere else is untrusted input. Loading:
- never unpickles: weights and constants are read as raw tensor bytes (weights.py), and
  pickled or custom-object entries are refused; sample inputs are never read;
- never evaluates strings from the file: every symbolic expression and node target in the
  program files is checked against what torch writes before torch reads it (untrusted.py);
- never answers wrong for a corrupted file: every member's CRC-32, size and SHA-256 are
  checked (archive.py), sizes before anything is decompressed;
- runs no native code the file carries unless the caller trusts the file: segments of
  delegates whose payloads are native code (AOTInductor libraries, TensorRT engines) are
  refused without `trust_native_code=True`;
- lets each delegate check its payload (`Delegate.check_payload`) before it is loaded;
- never imports a module a file names: the types of the inputs and outputs (a dataclass, a
  transformers ModelOutput) must be registered in this process already, or come back as
  plain dicts and tuples with `plain_containers=True` (treespecs.py).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer
from torch.export import ExportedProgram
from torch.export.pt2_archive.constants import (
    ARCHIVE_VERSION_PATH,
    ARCHIVE_VERSION_VALUE,
    EXECUTORCH_DIR,
    MODELS_FILENAME_FORMAT,
)

from nativert._program import WEIGHT_KINDS, rebuild_program
from nativert._program.accuracy import Accuracy
from nativert._program.meta import REASON_KEY
from nativert.backend.package.archive import Archive, check_byteorder
from nativert.backend.package.manifest import (
    DIM_NAMES_META,
    MANIFEST_MEMBER,
    TOP,
    manifest_of,
    program_with_inputs,
)
from nativert.backend.package.serde import dict_to_dataclass
from nativert.backend.package.treespecs import call_signatures, check_call_graph
from nativert.backend.package.untrusted import Refused, check_program_json
from nativert.backend.package.weights import load_constants, load_weights
from nativert.call_delegate import delegate_nodes
from nativert.delegate import CompileSpec, Delegate, get_delegate
from nativert.errors import PackageError, UnknownDelegateError
from nativert.lowered import LoweredBackendModule

_PROGRAM_LIMIT = 256 << 20  # a program's JSON: graph and signature, no weights


def load(
    path: str | os.PathLike,
    *,
    strict: bool = False,
    trust_native_code: bool = False,
    plain_containers: bool = False,
    mmap: bool = True,
) -> ExportedProgram:
    """Read a program saved by `save`, with every delegate restored.

    Weights are mapped from the file, not read into memory (`mmap=False` reads them): they
    cost this process memory only where something reads them, a delegate whose runtime maps
    files itself (ONNX Runtime) reads its weights from the package directly, and processes
    that load one package share its pages. Writing to a mapped weight changes this process's
    copy, never the file. Do not rewrite the file in place while it is loaded (copy a new
    version beside it and rename it over, as `save` does).

    A delegate whose runtime is missing here runs its reference program in PyTorch instead,
    with a warning naming it (`strict=True` raises PackageError). Segments whose payloads are
    native code (aoti, tensorrt) load only with `trust_native_code=True`. Raises
    PackageError, naming the file and the member, for a missing, truncated, corrupted,
    changed or wrong-version file, and for one that would need unpickling or evaluating.

    Inputs and outputs keep the types they were exported with (a dataclass, a transformers
    ModelOutput) when those types are registered with torch's pytree in this process: import
    the module that defines them first (`import transformers.modeling_outputs`). nativert
    never imports a module because a file names it, so an unregistered type raises
    PackageError naming the type and the import to add. With `plain_containers=True` every
    type other than tuple, list, dict, OrderedDict and deque becomes a plain container,
    whether registered or not: one whose fields are known (a registered dataclass, a
    ModelOutput) a dict of the fields present at export (fields that were None are left
    out), any other a tuple (a namedtuple, for one); a defaultdict a dict. `.module()` and
    `Executor` then return (and take) those plain containers; the tensors are the same.

        out = nativert.Executor(nativert.load("bert.pt2", plain_containers=True))(ids)
        out["last_hidden_state"]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackageError(f"{path}: no such file")
    with Archive(path) as archive:
        manifest = _checked_manifest(archive)
        entries = manifest["delegates"]
        delegates = [_delegate(entry, path, strict, trust_native_code) for entry in entries]
        top = _read_program(archive, TOP, plain_containers, mmap)
        segments = [
            _read_program(archive, entry["program"], plain_containers, mmap) for entry in entries
        ]
        payloads = [archive.read(f"{EXECUTORCH_DIR}{entry['payload']}") for entry in entries]
        archive.check_mapped()  # every weight's digest, before anything reads one
    for entry, (delegate, _), payload in zip(entries, delegates, payloads, strict=True):
        if delegate is not None:
            _check_segment(delegate, payload, entry, path)
    try:
        program = _restore(top, manifest, segments, payloads, delegates, path)
    except (PackageError, UnknownDelegateError):
        raise
    except Exception as exc:  # a manifest that does not fit its programs: name the file
        raise PackageError(
            f"{path}: cannot restore the delegates: {type(exc).__name__}: {exc}"
        ) from exc
    # Dim names do not survive torch's serialization; kept so that saving again keeps them.
    program.graph_module.meta[DIM_NAMES_META] = dict(manifest.get("dim_names", {}))
    return program


def read_call_specs(path: str | os.PathLike) -> dict[str, str]:
    """The top-level program's input and output structure as saved: {"in_spec": ...,
    "out_spec": ...}, each torch's serialized TreeSpec (JSON text), read from the checked
    file without torch and without any type registered (see treespecs.leaf_paths)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackageError(f"{path}: no such file")
    with Archive(path) as archive:
        _checked_manifest(archive)
        data = _program_json(archive, TOP)
    for fqn, signature in call_signatures(data):
        if fqn == "":
            return {key: signature.get(key) for key in ("in_spec", "out_spec")}
    raise PackageError(f"{path}: {MODELS_FILENAME_FORMAT.format(TOP)} has no call signature")


def _checked_manifest(archive: Archive) -> dict:
    """The manifest, with every later read checked against it, and the archive's version."""
    path = archive.path
    manifest = manifest_of(archive)
    archive.expect(manifest.get("members"), unlisted=frozenset({MANIFEST_MEMBER}))
    version = archive.read(ARCHIVE_VERSION_PATH, limit=64).decode("ascii", "replace")
    if version != ARCHIVE_VERSION_VALUE:
        raise PackageError(
            f"{path}: pt2 archive version {version!r}, this torch reads {ARCHIVE_VERSION_VALUE!r}"
        )
    check_byteorder(archive)
    return manifest


def _program_json(archive: Archive, name: str) -> dict:
    member = MODELS_FILENAME_FORMAT.format(name)
    try:
        return json.loads(archive.read(member, limit=_PROGRAM_LIMIT))
    except ValueError as exc:
        raise PackageError(f"{archive.path}: {member} is not valid JSON: {exc}") from exc


def _read_program(
    archive: Archive, name: str, plain_containers: bool, mapped: bool
) -> ExportedProgram:
    path = archive.path
    member = MODELS_FILENAME_FORMAT.format(name)
    data = _program_json(archive, name)

    def refused(why: str) -> PackageError:
        return PackageError(f"{path}: {member}: {why}")

    check_program_json(data, refused)
    try:
        check_call_graph(data, plain_containers=plain_containers)
    except Refused as exc:
        raise refused(str(exc)) from None
    state_dict = load_weights(archive, name, mapped=mapped)
    constants = load_constants(archive, name, mapped=mapped)
    try:
        serialized = dict_to_dataclass(schema.ExportedProgram, data)
        # Empty sample inputs: torch would torch.load them (weights_only=False fallback).
        program = ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, b"")
    except Exception as exc:
        raise PackageError(
            f"{path}: cannot read program {member}: {type(exc).__name__}: {exc}"
        ) from exc
    _check_weight_layouts(program, refused)
    return program


def _check_weight_layouts(program: ExportedProgram, refused: Any) -> None:
    """Every stored weight has the dtype and shape its placeholder declares: a tensor that
    does not (a quantized program's scales or zero points of the wrong length, say) would
    otherwise broadcast or index its way to a wrong answer."""
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    stored = {**program.state_dict, **program.constants}
    for spec in program.graph_signature.input_specs:
        if spec.kind not in WEIGHT_KINDS:
            continue
        want, got = values.get(spec.arg.name), stored.get(spec.target)
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
            continue
        if got.dtype != want.dtype or list(got.shape) != [int(d) for d in want.shape]:
            raise refused(
                f"weight {spec.target!r} is {str(got.dtype).removeprefix('torch.')}"
                f"{list(got.shape)}, but the program declares "
                f"{str(want.dtype).removeprefix('torch.')}{list(want.shape)}"
            )


def _delegate(
    entry: dict, path: str, strict: bool, trust_native_code: bool
) -> tuple[Delegate | None, str | None]:
    """The delegate that will run a segment, or None and why its reference runs instead.
    Refuses native-code payloads the caller does not trust, before anything is read."""
    backend_id = entry["backend_id"]
    try:
        delegate = get_delegate(backend_id)
    except UnknownDelegateError as exc:
        return _unavailable(entry, str(exc), path, strict)
    if delegate.executes_native_code and not trust_native_code:
        raise PackageError(
            f"{path}: segment {entry['module_name']!r} is a {backend_id!r} payload, which is "
            "native code that runs when it loads. Load the file with "
            "nativert.load(path, trust_native_code=True) (CLI: --trust-native-code) only "
            "if you trust where it came from"
        )
    availability = delegate.is_available()
    if not availability:
        return _unavailable(entry, availability.reason, path, strict)
    saved = entry["delegate_version"]
    if saved != delegate.version:
        why = (
            f"the payload was written by delegate version {saved!r}; this one is "
            f"version {delegate.version!r}"
        )
        return _unavailable(entry, why, path, strict)
    return delegate, None


def _unavailable(entry: dict, why: str, path: str, strict: bool) -> tuple[None, str]:
    message = (
        f"{path}: delegate {entry['backend_id']!r} of segment {entry['module_name']!r} is not "
        f"available here ({why})"
    )
    if strict:
        raise PackageError(message + "; strict=True")
    warnings.warn(
        message + "; its reference program runs in PyTorch instead", RuntimeWarning, stacklevel=4
    )
    return None, why


def _check_segment(delegate: Delegate, payload: bytes, entry: dict, path: str) -> None:
    """The delegate's checks of a segment's compile specs and payload, before either is
    used; a refusal names the file and the segment."""
    segment = f"segment {entry['module_name']!r} ({entry['backend_id']})"
    try:
        delegate.check_compile_specs(dict(entry["compile_specs"]))
    except ValueError as exc:
        raise PackageError(f"{path}: the compile specs of {segment} are refused: {exc}") from exc
    try:
        delegate.check_payload(payload)
    except ValueError as exc:
        raise PackageError(f"{path}: the payload of {segment} is refused: {exc}") from exc


def _restore(top, manifest, segments, payloads, delegates, path) -> ExportedProgram:
    state = {**top.state_dict, **top.constants}
    nodes = delegate_nodes(top)
    entries = manifest["delegates"]
    if len(nodes) != len(entries):
        raise PackageError(
            f"{path}: the program has {len(nodes)} delegate calls but the manifest lists "
            f"{len(entries)}"
        )
    gm = top.graph_module
    for node, entry, free, payload, (_, why) in zip(
        nodes, entries, segments, payloads, delegates, strict=True
    ):
        segment = program_with_inputs(free, entry["weights"], state, take_graph=True)
        lowered = LoweredBackendModule(
            backend_id=entry["backend_id"],
            processed_bytes=payload,
            compile_specs=[CompileSpec(k, v) for k, v in entry["compile_specs"]],
            original_module=segment,
            module_name=entry["module_name"],
            mutated_arg_indices=entry["mutated_arg_indices"],
            nondifferentiable_outputs=entry["nondifferentiable_outputs"],
            reference_reason=why,
            accuracy=(
                Accuracy.from_json(entry["accuracy"]) if entry.get("accuracy") is not None else None
            ),
        )
        attr, n = f"lowered_{entry['module_name']}", 0
        while hasattr(gm, attr):
            n += 1
            attr = f"lowered_{entry['module_name']}_{n}"
        gm.add_submodule(attr, lowered)
        with gm.graph.inserting_before(node):
            module_node = gm.graph.get_attr(attr)
        node.args = (module_node, *node.args[1:])
    for node in gm.graph.nodes:
        reason = manifest.get("reasons", {}).get(node.name)
        if reason is not None:
            node.meta[REASON_KEY] = reason
    gm.recompile()
    program = rebuild_program(top, gm)
    program.validate()
    return program

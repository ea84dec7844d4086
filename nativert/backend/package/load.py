"""`nativert.load`: a program saved by `nativert.save`, with every delegate restored.

Loading never unpickles. torch's own loaders unpickle in three places: weights or constants
marked `use_pickle`, custom objects, and sample inputs (torch.load falls back to
weights_only=False). `load` reads the archive itself, refuses the first two, and never reads
the third.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch.export import ExportedProgram

from nativert._program import rebuild_program
from nativert._program.meta import REASON_KEY
from nativert.backend.package.manifest import (
    FORMAT_VERSION,
    TOP,
    manifest_of,
    program_with_inputs,
)
from nativert.call_delegate import delegate_nodes
from nativert.delegate import CompileSpec, get_delegate
from nativert.errors import PackageError, UnknownDelegateError
from nativert.lowered import LoweredBackendModule


def _refuse_pickles(reader: Any, name: str, path: str) -> None:
    from torch.export.pt2_archive import _package as pt2
    from torch.export.pt2_archive.constants import (
        CONSTANTS_CONFIG_FILENAME_FORMAT,
        CONSTANTS_DIR,
        TENSOR_CONSTANT_FILENAME_PREFIX,
        WEIGHTS_CONFIG_FILENAME_FORMAT,
        WEIGHTS_DIR,
    )

    files = set(reader.get_file_names())
    for legacy in (f"{WEIGHTS_DIR}{name}.pt", f"{CONSTANTS_DIR}{name}.pt"):
        if legacy in files:
            raise PackageError(f"{path}: {legacy} is a pickle; refusing to load it")
    for fmt, what in (
        (WEIGHTS_CONFIG_FILENAME_FORMAT, "weight"),
        (CONSTANTS_CONFIG_FILENAME_FORMAT, "constant"),
    ):
        config_file = fmt.format(name)
        if config_file not in files:
            raise PackageError(f"{path}: {config_file} is missing")
        config = pt2._load_payload_config(reader, config_file)
        for fqn, meta in config.config.items():
            if meta.use_pickle:
                raise PackageError(
                    f"{path}: {what} {fqn!r} of {name!r} is stored as a pickle; nativert "
                    "never unpickles, so it refuses this file"
                )
            if what == "constant" and not meta.path_name.startswith(
                TENSOR_CONSTANT_FILENAME_PREFIX
            ):
                raise PackageError(
                    f"{path}: constant {fqn!r} of {name!r} is a custom object; nativert "
                    "cannot load those without unpickling"
                )


def _read_program(reader: Any, name: str, path: str) -> ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive import _package as pt2
    from torch.export.pt2_archive.constants import MODELS_FILENAME_FORMAT

    _refuse_pickles(reader, name, path)
    serialized = _bytes_to_dataclass(
        schema.ExportedProgram, reader.read_bytes(MODELS_FILENAME_FORMAT.format(name))
    )
    state_dict = pt2._load_state_dict(reader, name)
    constants = pt2._load_constants(reader, name)
    # Empty sample inputs: torch would torch.load them, falling back to weights_only=False.
    return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, b"")


def load(path: str | os.PathLike, *, strict: bool = False) -> ExportedProgram:
    """Read a program saved by `save`, with every delegate restored.

    A delegate whose runtime is missing here runs its reference program in PyTorch instead,
    with a warning naming it (`strict=True` raises PackageError). Raises PackageError for
    a missing, truncated, corrupted or wrong-version file, or one that would need unpickling.
    """
    from torch.export.pt2_archive._package import PT2ArchiveReader
    from torch.export.pt2_archive.constants import (
        ARCHIVE_VERSION_PATH,
        ARCHIVE_VERSION_VALUE,
        EXECUTORCH_DIR,
    )

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackageError(f"{path}: no such file")
    try:
        reader_cm = PT2ArchiveReader(path)
    except Exception as exc:
        raise PackageError(
            f"{path} is not a readable .pt2 archive (truncated or corrupted?): {exc}"
        ) from exc
    with reader_cm as reader:
        try:
            files = set(reader.get_file_names())
            version = reader.read_string(ARCHIVE_VERSION_PATH)
        except Exception as exc:
            raise PackageError(f"{path}: cannot read the archive: {exc}") from exc
        if version != ARCHIVE_VERSION_VALUE:
            raise PackageError(
                f"{path}: pt2 archive version {version!r}, this torch reads "
                f"{ARCHIVE_VERSION_VALUE!r}"
            )
        manifest = manifest_of(reader, files, path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"{path}: nativert package format {manifest.get('format_version')!r}; this "
                f"nativert reads format {FORMAT_VERSION}"
            )
        try:
            top = _read_program(reader, TOP, path)
            entries = manifest["delegates"]
            segments = [_read_program(reader, e["program"], path) for e in entries]
            payloads = [reader.read_bytes(f"{EXECUTORCH_DIR}{e['payload']}") for e in entries]
        except PackageError:
            raise
        except Exception as exc:
            raise PackageError(
                f"{path}: cannot read a program: {type(exc).__name__}: {exc}"
            ) from exc
    try:
        return _restore(top, manifest, segments, payloads, path, strict)
    except (PackageError, UnknownDelegateError):
        raise
    except Exception as exc:  # a corrupted payload or manifest: name the file
        raise PackageError(
            f"{path}: cannot restore the delegates: {type(exc).__name__}: {exc}"
        ) from exc


def _restore(top, manifest, segments, payloads, path, strict) -> ExportedProgram:
    state = {**top.state_dict, **top.constants}
    nodes = delegate_nodes(top)
    entries = manifest["delegates"]
    if len(nodes) != len(entries):
        raise PackageError(
            f"{path}: the program has {len(nodes)} delegate calls but the manifest lists "
            f"{len(entries)}"
        )
    gm = top.graph_module
    for node, entry, free, payload in zip(nodes, entries, segments, payloads, strict=True):
        segment = program_with_inputs(free, entry["weights"], state)
        lowered = _lowered(entry, segment, payload, path, strict)
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


def _lowered(entry, segment, payload, path, strict) -> LoweredBackendModule:
    backend_id = entry["backend_id"]
    specs = [CompileSpec(k, v) for k, v in entry["compile_specs"]]
    common = dict(
        backend_id=backend_id,
        processed_bytes=payload,
        compile_specs=specs,
        original_module=segment,
        module_name=entry["module_name"],
        mutated_arg_indices=entry["mutated_arg_indices"],
        nondifferentiable_outputs=entry["nondifferentiable_outputs"],
    )
    try:
        delegate = get_delegate(backend_id)
        availability = delegate.is_available()
        why = None if availability else availability.reason
        saved = entry.get("delegate_version")
        if why is None and saved != delegate.version:
            why = (
                f"the payload was written by delegate version {saved!r}; this one is "
                f"version {delegate.version!r}"
            )
    except UnknownDelegateError as exc:
        why = str(exc)
    if why is None:
        return LoweredBackendModule(**common)
    message = (
        f"{path}: delegate {backend_id!r} of segment {entry['module_name']!r} is not "
        f"available here ({why})"
    )
    if strict:
        raise PackageError(message + "; strict=True")
    warnings.warn(
        message + "; its reference program runs in PyTorch instead",
        RuntimeWarning,
        stacklevel=3,
    )
    return LoweredBackendModule(**common, reference_reason=why)

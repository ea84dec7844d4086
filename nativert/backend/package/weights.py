"""A program's weights and constants from a checked archive, without torch's loaders.

torch's `_load_state_dict` / `_load_constants` unpickle (`use_pickle` entries, custom and
opaque objects) and decompress a member whatever its size. Here a member must be raw tensor
bytes: its declared size must equal what its tensors reach (`nativert.save` writes each
storage trimmed to that), checked before anything is decompressed, so a member of 1 GiB of
zeros behind a 4-element tensor is refused without reading it.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import (
    deserialize_device,
    deserialize_scalar_type,
)
from torch.export.pt2_archive.constants import (
    CONSTANTS_CONFIG_FILENAME_FORMAT,
    CONSTANTS_DIR,
    TENSOR_CONSTANT_FILENAME_PREFIX,
    WEIGHTS_CONFIG_FILENAME_FORMAT,
    WEIGHTS_DIR,
)

from nativert._program.tensors import storage_reach
from nativert.backend.package.archive import Archive
from nativert.backend.package.serde import dict_to_dataclass
from nativert.errors import PackageError

_CONFIG_LIMIT = 64 << 20  # a config file is JSON metadata: far below this


def load_weights(archive: Archive, model: str, *, mapped: bool) -> dict[str, torch.Tensor]:
    """The program's parameters and persistent buffers, by FQN; with `mapped`, over the
    file's pages (see `Archive.map_tensor`) wherever the member allows it."""
    return _load(archive, model, WEIGHTS_CONFIG_FILENAME_FORMAT, WEIGHTS_DIR, "weight", mapped)


def load_constants(archive: Archive, model: str, *, mapped: bool) -> dict[str, torch.Tensor]:
    """The program's tensor constants (custom objects are refused: they need unpickling)."""
    return _load(
        archive, model, CONSTANTS_CONFIG_FILENAME_FORMAT, CONSTANTS_DIR, "constant", mapped
    )


def _load(
    archive: Archive, model: str, config_format: str, directory: str, what: str, mapped: bool
):
    path = archive.path
    for legacy in (f"{WEIGHTS_DIR}{model}.pt", f"{CONSTANTS_DIR}{model}.pt"):
        if legacy in archive.names():
            raise PackageError(f"{path}: {legacy} is a pickle; refusing to load it")
    config_name = config_format.format(model)
    try:
        raw = json.loads(archive.read(config_name, limit=_CONFIG_LIMIT))
        config = dict_to_dataclass(schema.PayloadConfig, raw)
    except PackageError:
        raise
    except Exception as exc:
        raise PackageError(f"{path}: {config_name} is not a payload config: {exc}") from exc
    files: dict[str, list[tuple[str, Any]]] = {}
    for fqn, meta in config.config.items():
        where = f"{path}: {what} {fqn!r} of {model!r}"
        if meta.use_pickle:
            raise PackageError(
                f"{where} is stored as a pickle; nativert never unpickles, so it refuses this file"
            )
        if what == "constant" and not meta.path_name.startswith(TENSOR_CONSTANT_FILENAME_PREFIX):
            raise PackageError(
                f"{where} is a custom object; nativert cannot load those without unpickling"
            )
        if meta.tensor_meta is None:
            raise PackageError(f"{where} has no tensor metadata")
        files.setdefault(meta.path_name, []).append((fqn, meta.tensor_meta))
    tensors: dict[str, torch.Tensor] = {}
    for path_name, entries in files.items():
        flat = _storage(archive, directory + path_name, entries, mapped)
        for fqn, meta in entries:
            size, stride, offset = _layout(meta, archive.path, fqn)
            tensor = torch.as_strided(flat, size, stride, offset)
            device = deserialize_device(meta.device)
            if device.type != "cpu":
                tensor = tensor.to(device)
            is_param = config.config[fqn].is_param
            tensors[fqn] = (
                torch.nn.Parameter(tensor, requires_grad=meta.requires_grad) if is_param else tensor
            )
    return tensors


def _layout(meta: Any, path: str, fqn: str) -> tuple[list[int], list[int], int]:
    """Sizes, strides and storage offset: plain non-negative ints, or the file is refused."""

    def ints(values: Any) -> list[int]:
        out = [v.as_int if v.type == "as_int" else None for v in values]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in out):
            raise PackageError(f"{path}: {fqn!r} has a size or stride that is not an int")
        return out

    size, stride = ints(meta.sizes), ints(meta.strides)
    (offset,) = ints([meta.storage_offset])
    if len(size) != len(stride):
        raise PackageError(f"{path}: {fqn!r} has {len(size)} sizes but {len(stride)} strides")
    return size, stride, offset


def _storage(
    archive: Archive, member: str, entries: list[tuple[str, Any]], mapped: bool
) -> torch.Tensor:
    """The flat storage the entries view, after checking its declared size against them."""
    dtypes = {deserialize_scalar_type(meta.dtype) for _, meta in entries}
    if len(dtypes) != 1:
        raise PackageError(f"{archive.path}: {member} is viewed with several dtypes {dtypes}")
    (dtype,) = dtypes
    element = torch.empty(0, dtype=dtype).element_size()
    reach = 0
    for fqn, meta in entries:
        reach = max(reach, storage_reach(*_layout(meta, archive.path, fqn)))
    if mapped:
        flat = archive.map_tensor(member, dtype, reach * element)
        if flat is not None:
            return flat
    return archive.read_tensor(member, dtype, reach * element)

"""Weights that are pages of a package file: which file, and where in it.

`nativert.load` maps a package's weight members (copy-on-write) instead of reading them into
memory, and records here where each mapped storage lies in the file. A delegate whose runtime
can map the file itself (ONNX Runtime's external data) asks `file_region(tensor)` and hands
the runtime the file region instead of the tensor: the runtime then owns its copy (and drops
what it repacks), the torch tensor stays untouched pages of the page cache, and processes
that load one package share its pages.

A region is answered only while the tensor still holds the file's bytes: a tensor written
since it was mapped (its version counter moved; the page is then a private copy) is not in
the file any more and gets `None`, as does every tensor that was never mapped. A runtime opens
the file by its path, which by then may name another file (a new version saved over it):
`is_current(region)` says whether the path still names the file that was mapped; check it
before and after the runtime reads it.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class FileRegion:
    """`nbytes` bytes of the file at `path`, from byte `offset`."""

    path: str
    offset: int
    nbytes: int
    identity: tuple[int, ...]  # of the file mapped: device, inode, size, change time


def identity(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def is_current(region: FileRegion) -> bool:
    """Whether `region.path` still names the file that was mapped, unchanged."""
    try:
        return identity(os.stat(region.path)) == region.identity
    except OSError:
        return False


@dataclass(frozen=True)
class _Mapped:
    path: str
    identity: tuple[int, ...]
    offset: int  # of the storage's first byte in the file
    nbytes: int  # of the storage
    owner: weakref.ref  # the mmap: while it lives, the storage's address is this mapping
    version: int  # the storage's version counter when it was mapped


_LOCK = threading.Lock()
_STORAGES: dict[int, _Mapped] = {}  # by the storage's data pointer


def register(flat: torch.Tensor, owner: Any, path: str, stat: os.stat_result, offset: int) -> None:
    """Record that `flat` (a whole storage over `owner`, an mmap of the file at `path`, whose
    `os.fstat` is `stat`) is the file's bytes at `offset`."""
    storage = flat.untyped_storage()
    entry = _Mapped(
        path, identity(stat), offset, storage.nbytes(), weakref.ref(owner), flat._version
    )
    ptr = storage.data_ptr()
    with _LOCK:
        _STORAGES[ptr] = entry
        weakref.finalize(owner, _forget, ptr, entry)


def _forget(ptr: int, entry: _Mapped) -> None:
    with _LOCK:
        if _STORAGES.get(ptr) is entry:
            del _STORAGES[ptr]


def _lookup(tensor: torch.Tensor) -> tuple[_Mapped, FileRegion] | None:
    """The mapping record of `tensor`'s storage and the tensor's bytes in the file, or None
    (not mapped, written since, or not one dense block)."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
        return None
    if tensor.layout != torch.strided or not tensor.is_contiguous():
        return None
    storage = tensor.untyped_storage()
    with _LOCK:
        entry = _STORAGES.get(storage.data_ptr())
    if entry is None or entry.owner() is None or tensor._version != entry.version:
        return None
    start = tensor.storage_offset() * tensor.element_size()
    nbytes = tensor.numel() * tensor.element_size()
    if start + nbytes > entry.nbytes:
        return None
    return entry, FileRegion(entry.path, entry.offset + start, nbytes, entry.identity)


def file_region(tensor: torch.Tensor) -> FileRegion | None:
    """Where `tensor`'s bytes are in a package file, or None (not mapped, written since,
    or not one dense block)."""
    found = _lookup(tensor)
    return None if found is None else found[1]


def release(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the pages of mapped, unwritten tensors from this process: call it once a
    delegate's runtime has copied them into its own memory (OpenVINO's and AOTInductor's
    constants), so the process does not hold both. They stay in the page cache; a later read
    maps them again, with the file's bytes, which is what they hold (written tensors and
    pages shared with a neighbouring tensor are left alone)."""
    for tensor in tensors:
        found = _lookup(tensor)
        owner = None if found is None else found[0].owner()
        if owner is not None:
            drop_pages(owner, found[1].offset, found[1].nbytes)


def drop_pages(mapping: mmap.mmap, offset: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages of the mapping within `nbytes` bytes from
    `offset` (the edge pages may hold a neighbour's bytes: they stay), where the system has
    it (Linux, macOS); elsewhere the pages simply stay."""
    first = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and hasattr(mmap, "MADV_DONTNEED") and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)

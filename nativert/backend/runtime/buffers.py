"""Output buffers a runtime writes into, reused once the caller has provably let go of them.

A runtime called with preallocated outputs (ONNX Runtime's IOBinding) pays for a fresh output
on every call: an allocation, a new binding, and memory that is cold in the cache. Reusing
the last output is only safe when nothing outside can still see it. `OutputBuffer` owns the
memory through a private tensor that never leaves it; each call hands out a new alias (a
detached tensor over the same storage: a new Python object with its own sizes, flags and
autograd state, so nothing a caller did to an earlier alias carries over). The buffer is
free again when no alias, view, numpy array, DLPack capsule or storage object made from it
is alive: see `released`.
"""

from __future__ import annotations

import sys

import torch

_use_count = torch._C._storage_Use_Count


class OutputBuffer:
    """One output's memory: `alias()` hands it out, `released()` says it may be written
    again. Not thread-safe by itself: keep one per thread (the holders may be anywhere)."""

    __slots__ = ("_base", "_storage", "_cdata", "_uses", "_refs", "ptr")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        # A normal tensor even under inference_mode: the caller may update outputs in place
        # after leaving it.
        with torch.inference_mode(False):
            self._base = torch.empty(shape, dtype=dtype)
        self.ptr = self._base.data_ptr()
        # The storage's Python object: once it exists torch keeps it as long as the storage
        # (and every `alias.untyped_storage()` returns it), so a caller can hold the memory
        # through it without raising the storage's use count. Holding it here makes it
        # exist from the start; its Python refcount shows the holders the use count cannot.
        self._storage = self._base.untyped_storage()
        self._cdata = self._storage._cdata
        self._uses = _use_count(self._cdata)  # the base and the storage object, nothing else
        self._refs = sys.getrefcount(self._storage)

    def alias(self) -> torch.Tensor:
        """A new tensor over the buffer (not a view: no `_base` leads back to the owner)."""
        return self._base.detach()

    def released(self) -> bool:
        """True when nothing but this buffer holds its memory, and it is still the memory
        (an alias could have resized the shared storage, which moves it).

        Every holder either holds the storage (aliases and their views, numpy arrays, DLPack
        capsules: the use count) or its Python object (the refcount). A holder can move from
        one to the other (`alias.untyped_storage()`, then drop the alias), so the two counts
        must be read as one snapshot: reading the use count twice around the refcount means
        at least one of the two pairs had no thread switch inside it under the GIL (a switch
        needs the 5 ms switch interval to pass again before the next one). Once nothing holds
        the memory, nothing can reach it again.
        """
        return (
            _use_count(self._cdata) == self._uses
            and sys.getrefcount(self._storage) == self._refs
            and _use_count(self._cdata) == self._uses
            and self._base.data_ptr() == self.ptr
        )

"""On-disk cache of compiled delegate payloads, shared by to_backend and torch.compile.

A payload is what `Delegate.preprocess` returns for a segment. Its key covers everything that
can change those bytes: the segment's code, each placeholder's dtype, shape (symbolic dims by
name), strides and device, the signature, the range constraints of dynamic dims, the compile
specs, the delegate's id and version, and the torch and nativert versions. Weight *values*
are not in the key: delegates take weights at `init_weights`, never from the payload.

Entries are written atomically (temporary file, then rename) with a header that carries the
key and a SHA-256 of the payload. An entry that cannot be read, or whose header or checksum
does not match, is ignored (logged at WARNING) and rebuilt: a corrupt cache never fails a
compile. Entries are plain bytes; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.export import ExportedProgram

from nativert._version import __version__
from nativert.settings import DEFAULT_CACHE

logger = logging.getLogger("nativert")

_MAGIC = b"NATIVERT-PAYLOAD\n"
_FORMAT = 1


def default_cache_dir() -> Path:
    """$NATIVERT_CACHE_DIR, else $XDG_CACHE_HOME/nativert, else ~/.cache/nativert."""
    explicit = os.environ.get("NATIVERT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nativert"


def cache_root(cache_dir: str | os.PathLike | None) -> Path | None:
    """The directory a `cache_dir` setting names: "default" (default_cache_dir()), a path, or
    None for no cache."""
    if cache_dir is None:
        return None
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path, 'default' or None, got {cache_dir!r}")
    return default_cache_dir() if cache_dir == DEFAULT_CACHE else Path(cache_dir)


def payload_cache(cache_dir: str | os.PathLike | None) -> PayloadCache | None:
    """The payload cache for a `cache_dir` setting (None: no cache)."""
    root = cache_root(cache_dir)
    return None if root is None else PayloadCache(root)


def _value_text(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}stride{list(value.stride())}@{value.device.type}"
    return f"{type(value).__name__}:{value}"


def segment_key(
    segment: ExportedProgram,
    backend_id: str,
    delegate_versions: Mapping[str, str],
    compile_specs: Sequence[object],
) -> str:
    """The cache key of compiling `segment` with one delegate and its specs.

    `delegate_versions`: the delegate's own version and those of the tools it compiles with
    (exporter, runtime), so upgrading any of them misses the cache."""
    placeholders = [
        f"{n.name}:{_value_text(n.meta.get('val'))}"
        for n in segment.graph.nodes
        if n.op == "placeholder"
    ]
    specs = [
        dataclasses.asdict(s) if dataclasses.is_dataclass(s) else repr(s) for s in compile_specs
    ]
    parts = {
        "format": _FORMAT,
        "backend": backend_id,
        "delegate_versions": dict(delegate_versions),
        "torch": torch.__version__,
        "nativert": __version__,
        "code": segment.graph_module.code,
        "placeholders": placeholders,
        "signature": str(segment.graph_signature),
        "ranges": sorted(f"{k}:{v}" for k, v in segment.range_constraints.items()),
        "specs": specs,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0


class PayloadCache:
    """Payload bytes by key, in one directory (created on first write)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.stats = CacheStats()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.payload"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as exc:
            return self._corrupt(path, f"cannot be read ({exc})")
        header_end = len(_MAGIC) + 64 + 1 + 64 + 1
        if len(data) < header_end or not data.startswith(_MAGIC):
            return self._corrupt(path, "has no nativert payload header")
        stored_key = data[len(_MAGIC) : len(_MAGIC) + 64].decode("ascii", "replace")
        digest = data[len(_MAGIC) + 65 : len(_MAGIC) + 129].decode("ascii", "replace")
        payload = data[header_end:]
        if stored_key != key:
            return self._corrupt(path, "belongs to another key")
        if hashlib.sha256(payload).hexdigest() != digest:
            return self._corrupt(path, "fails its checksum (truncated or overwritten)")
        self.stats.hits += 1
        return payload

    def _corrupt(self, path: Path, why: str) -> None:
        self.stats.corrupt += 1
        self.stats.misses += 1
        logger.warning("nativert cache entry %s %s; ignoring it and compiling again", path, why)
        return None

    def put(self, key: str, payload: bytes) -> None:
        path = self._path(key)
        digest = hashlib.sha256(payload).hexdigest()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + key.encode() + b"\n" + digest.encode() + b"\n" + payload)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only or full disk costs speed, not the compile
            logger.warning("nativert cache: cannot write %s (%s); continuing without it", path, exc)

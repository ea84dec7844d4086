"""Reading a .pt2 archive that nobody vouches for: every byte checked before it is used.

The zip is read with Python's zipfile, which checks each member's CRC-32 as it reads (torch's
own reader does not). Once the manifest is read, every member must be listed in it with its
size and SHA-256 (written by `nativert.save`): a size that differs is refused before anything
is decompressed, and a digest that differs (a file changed and re-zipped with fresh CRCs)
after. Members the manifest does not list are refused too, so nothing rides along unchecked.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from nativert._program.mapped import drop_pages, register
from nativert.errors import PackageError

_CHUNK = 1 << 20
# What zipfile raises for a malformed archive: besides BadZipFile, a flipped bit in a header
# gives UnicodeDecodeError (a ValueError) for a name, RuntimeError ("is encrypted") for the
# flags, NotImplementedError for the compression method.
_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    NotImplementedError,
    ValueError,
    RuntimeError,
)


def digest_members(path: str) -> dict[str, dict[str, Any]]:
    """{member: {"size": bytes, "sha256": hex}} for every member of a zip (root folder
    stripped), streamed: what `nativert.save` records and `Archive` checks."""
    members = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            sha = hashlib.sha256()
            with archive.open(info) as f:
                while chunk := f.read(_CHUNK):
                    sha.update(chunk)
            members[info.filename.split("/", 1)[1]] = {
                "size": info.file_size,
                "sha256": sha.hexdigest(),
            }
    return members


class Archive:
    """A .pt2 zip opened for checked reads (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except _READ_ERRORS as exc:
            raise PackageError(
                f"{path} is not a readable .pt2 archive (truncated or corrupted?): {exc}"
            ) from exc
        roots = {info.filename.split("/", 1)[0] for info in infos}
        if len(roots) != 1 or any("/" not in info.filename for info in infos):
            raise PackageError(f"{path}: a .pt2 archive keeps every member in one root folder")
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = info.filename.split("/", 1)[1]
            if name in self._infos:
                raise PackageError(f"{path}: member {name} appears twice")
            self._infos[name] = info
        self._digests: dict[str, dict[str, Any]] | None = None
        self._map: mmap.mmap | None = None
        self._stat: os.stat_result | None = None
        self._checks: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._checks is not None:
            self._checks.shutdown(wait=True, cancel_futures=True)
        self._zip.close()

    def names(self) -> set[str]:
        return set(self._infos)

    def expect(self, digests: Any, *, unlisted: frozenset[str] = frozenset()) -> None:
        """From now on check every read against `digests` ({member: {"size", "sha256"}});
        the archive must hold exactly those members (plus `unlisted` ones)."""
        if not isinstance(digests, dict) or not all(
            isinstance(d, dict)
            and isinstance(d.get("size"), int)
            and isinstance(d.get("sha256"), str)
            for d in digests.values()
        ):
            raise PackageError(f"{self.path}: the manifest's member digests are malformed")
        extra = sorted(self.names() - set(digests) - unlisted)
        missing = sorted(set(digests) - self.names())
        if extra or missing:
            raise PackageError(
                f"{self.path}: its members do not match its manifest (not listed: "
                f"{extra or 'none'}; missing: {missing or 'none'}); the file was changed "
                "after it was saved"
            )
        self._digests = digests

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        """The member's bytes, checked: declared size (against `limit` and the manifest)
        before decompressing, CRC-32 while reading, SHA-256 after."""
        info, expected = self._checked_info(name, limit)
        try:
            data = self._zip.read(info)
        except _READ_ERRORS as exc:
            raise PackageError(f"{self.path}: member {name} is corrupted: {exc}") from exc
        if expected is not None and hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise self._changed(name)
        return data

    def read_tensor(self, name: str, dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        """The member as a flat tensor of `dtype`, which must be exactly `nbytes` long:
        checked before decompressing, streamed into the tensor (no second copy)."""
        info, expected = self._sized_info(name, nbytes)
        element = torch.empty(0, dtype=dtype).element_size()
        flat = torch.empty(nbytes // element, dtype=dtype)
        view = memoryview(flat.view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        sha = hashlib.sha256()
        try:
            with self._zip.open(info) as f:
                done = 0
                while done < nbytes:
                    chunk = f.read(min(_CHUNK, nbytes - done))
                    if not chunk:
                        raise PackageError(f"{self.path}: member {name} ends early")
                    view[done : done + len(chunk)] = chunk
                    sha.update(chunk)
                    done += len(chunk)
                if f.read(1):  # also makes zipfile check the CRC at the end
                    raise PackageError(f"{self.path}: member {name} is longer than declared")
        except _READ_ERRORS as exc:
            raise PackageError(f"{self.path}: member {name} is corrupted: {exc}") from exc
        if expected is not None and sha.hexdigest() != expected["sha256"]:
            raise self._changed(name)
        return flat

    def map_tensor(self, name: str, dtype: torch.dtype, nbytes: int) -> torch.Tensor | None:
        """The member as a flat tensor over the file's own pages (copy-on-write: writing to
        it never changes the file), checked like `read_tensor` but on a thread (`check_mapped`
        waits for the checks); None when the member cannot be mapped (compressed, or not
        aligned for `dtype`): read it instead.

        Hashing reads every page; they are then dropped from this process (they stay in the
        page cache, shared with every process that maps the file), so a weight that only a
        delegate's runtime reads costs this process nothing. The file must not be changed in
        place while the tensors live (`nativert.save` replaces a file, it never rewrites it)."""
        info, expected = self._sized_info(name, nbytes)
        element = torch.empty(0, dtype=dtype).element_size()
        if info.compress_type != zipfile.ZIP_STORED or nbytes == 0:
            return None
        mapped = self._mapping()
        start = self._data_start(name, info, mapped)
        if start % element:
            return None
        flat = torch.frombuffer(mapped, dtype=dtype, count=nbytes // element, offset=start)
        # Checked on a thread (hashlib lets go of the GIL) while the caller goes on reading
        # the programs; `check_mapped` waits for every check.
        if self._checks is None:
            self._checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nativert-load")
        self._pending.append(
            self._checks.submit(self._check_mapped, name, info, expected, start, nbytes)
        )
        register(flat, mapped, os.path.abspath(self.path), self._stat, start)
        return flat

    def _check_mapped(
        self, name: str, info: zipfile.ZipInfo, expected: Any, start: int, nbytes: int
    ) -> None:
        mapped = self._map
        view = memoryview(mapped)[start : start + nbytes]
        try:
            if expected is not None:
                if hashlib.sha256(view).hexdigest() != expected["sha256"]:
                    raise self._changed(name)
            elif zlib.crc32(view) != info.CRC:
                raise PackageError(f"{self.path}: member {name} is corrupted: bad CRC-32")
        finally:
            view.release()
        drop_pages(mapped, start, nbytes)

    def check_mapped(self) -> None:
        """Wait for the digest checks of every mapped member; raise the first failure. Call
        it before anything reads a mapped tensor."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _mapping(self) -> mmap.mmap:
        """The file zipfile reads (its open handle: not whatever the path names now)."""
        if self._map is None:
            fd = self._zip.fp.fileno()
            try:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                self._stat = os.fstat(fd)
            except (OSError, ValueError) as exc:
                raise PackageError(f"{self.path}: cannot map the file: {exc}") from exc
        return self._map

    def _data_start(self, name: str, info: zipfile.ZipInfo, mapped: mmap.mmap) -> int:
        """Where the member's bytes begin: after its local header, which must agree with the
        central directory (zipfile checks the same when it reads)."""
        header = mapped[info.header_offset : info.header_offset + 30]
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise PackageError(f"{self.path}: member {name} has no valid local header")
        method, name_len, extra_len = struct.unpack("<8xH16xHH", header)
        start = info.header_offset + 30 + name_len + extra_len
        if method != info.compress_type or start + info.file_size > len(mapped):
            raise PackageError(f"{self.path}: member {name} has a corrupted local header")
        return start

    def _info(self, name: str) -> zipfile.ZipInfo:
        info = self._infos.get(name)
        if info is None:
            raise PackageError(f"{self.path}: member {name} is missing")
        return info

    def _sized_info(self, name: str, nbytes: int) -> tuple[zipfile.ZipInfo, Any]:
        """`_checked_info`, for a member that must be exactly `nbytes` long (its tensors'
        reach): a different declared size is refused before anything is read."""
        info, expected = self._checked_info(name, None)
        if info.file_size != nbytes:
            raise PackageError(
                f"{self.path}: member {name} declares {info.file_size} bytes but its tensors "
                f"need {nbytes}; refusing to decompress it"
            )
        return info, expected

    def _checked_info(self, name: str, limit: int | None) -> tuple[zipfile.ZipInfo, Any]:
        info = self._info(name)
        expected = None
        if self._digests is not None:
            expected = self._digests.get(name)
            if expected is None:
                raise PackageError(f"{self.path}: member {name} is not in the manifest")
            if info.file_size != expected["size"]:
                raise PackageError(
                    f"{self.path}: member {name} declares {info.file_size} bytes, the manifest "
                    f"{expected['size']}; the file was changed after it was saved"
                )
        if limit is not None and info.file_size > limit:
            raise PackageError(
                f"{self.path}: member {name} declares {info.file_size} bytes, more than the "
                f"{limit} such a member may hold; refusing to decompress it"
            )
        return info, expected

    def _changed(self, name: str) -> PackageError:
        return PackageError(
            f"{self.path}: member {name} fails its SHA-256 check: the file was changed or "
            "corrupted after it was saved"
        )


def check_byteorder(archive: Archive) -> None:
    if "byteorder" in archive.names():
        order = archive.read("byteorder", limit=16).decode("ascii", "replace").strip()
        if order != sys.byteorder:
            raise PackageError(
                f"{archive.path}: tensors were saved {order}-endian; this machine is "
                f"{sys.byteorder}-endian"
            )

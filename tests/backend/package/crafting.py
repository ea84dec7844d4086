"""Helpers that craft hostile .pt2 files, as an attacker would: change members, then (by
default) recompute the manifest's digests so that the change gets past the integrity check
and reaches the check the test is about."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

MANIFEST = "extra/nativert/manifest.json"


class Trap:
    """Unpickling this creates a file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def trap_bytes(marker: Path) -> bytes:
    trap = Trap()
    trap.marker = str(marker)
    return pickle.dumps(trap)


def read_members(path: Path) -> tuple[str, dict[str, bytes]]:
    """The archive's root folder and {member (root stripped): bytes}."""
    with zipfile.ZipFile(path) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        return root, {i.filename.split("/", 1)[1]: archive.read(i) for i in archive.infolist()}


def write_members(dst: Path, root: str, members: dict[str, bytes], *, refresh: bool) -> None:
    if refresh:
        manifest = json.loads(members[MANIFEST])
        manifest["members"] = {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in members.items()
            if name != MANIFEST
        }
        members = {**members, MANIFEST: json.dumps(manifest).encode()}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)


def rewrite(src: Path, dst: Path, replace: dict[str, bytes], *, refresh: bool = True) -> None:
    """dst = src with some members replaced (fresh CRCs; digests recomputed if `refresh`)."""
    root, members = read_members(src)
    missing = set(replace) - set(members) - {n for n in replace if n.startswith("data/")}
    assert not missing, f"no such members: {missing}"
    write_members(dst, root, {**members, **replace}, refresh=refresh)


def edit_json(src: Path, dst: Path, member: str, edit: Callable[[dict], None]) -> None:
    """dst = src with one JSON member edited in place by `edit` (digests recomputed)."""
    _, members = read_members(src)
    data = json.loads(members[member])
    edit(data)
    rewrite(src, dst, {member: json.dumps(data).encode()})


def member_name(path: Path, suffix: str) -> str:
    _, members = read_members(path)
    (name,) = [n for n in members if n.endswith(suffix)]
    return name

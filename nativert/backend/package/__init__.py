"""Packages: `save` and `load` delegated programs as .pt2 archives (see each module)."""

from nativert.backend.package.load import load
from nativert.backend.package.manifest import read_manifest
from nativert.backend.package.save import save

__all__ = ["load", "read_manifest", "save"]

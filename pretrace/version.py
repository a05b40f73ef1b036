"""The installed version, read once from the package metadata (a source tree never installed says "0+unknown")."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("pretrace")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

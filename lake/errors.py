"""The exceptions reading the lake raises; ``str(err)`` is a complete one-line reason."""
from __future__ import annotations

from app.errors import StratumError

__all__ = ["LakeError", "DataError", "StorageError"]


class LakeError(StratumError):
    """Base class of the lake's failures."""


class DataError(LakeError):
    """The dataset cannot be used (schema, types, too few rows or classes)."""


class StorageError(LakeError):
    """The lake or the registry cannot be read or written."""

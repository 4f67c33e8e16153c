"""The exceptions :mod:`models` raises: one base class, so callers can catch them all."""
from __future__ import annotations

from app.errors import StratumError
from transport.protocol import MessageError

__all__ = ["ModelError", "ManifestError", "ArtifactError", "MessageError"]


class ModelError(StratumError):
    """Base class of every error raised by :mod:`models`; ``str(err)`` is the reason."""


class ManifestError(ModelError):
    """A manifest does not follow the schema; the message says which field and why."""


class ArtifactError(ModelError):
    """A model version cannot be used: unreadable, tampered with, incomplete or inconsistent."""


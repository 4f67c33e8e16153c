"""The base of Stratum's own exceptions, which every layer may raise and catch."""
from __future__ import annotations

__all__ = ["StratumError"]


class StratumError(Exception):
    """Base class of the errors Stratum raises itself: ``str(err)`` is a complete one-line
    reason, fit for a log line, a refusal or a command's one-line error."""

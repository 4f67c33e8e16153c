"""Stratum's Faust application.

``faust -A app worker`` finds :data:`app` here; its settings are ``app.settings``. The App is
built on first access rather than at import, so ``import app.settings`` (the batch job,
scripts, tests) does no work and never needs a broker.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.application import StratumApp

    app: StratumApp

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from app import application

        value = getattr(application, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'app' has no attribute {name!r}")

"""Stratum's Faust application.

``faust -A app worker`` finds :data:`app` here. The App and the settings are built on first
access rather than at import, so ``import app.settings`` (the batch job, scripts, tests) does
no work and never needs a broker.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.application import StratumApp
    from app.settings import Settings

    app: StratumApp
    settings: Settings

__all__ = ["app", "settings"]


def __getattr__(name: str) -> Any:
    if name in ("app", "settings"):
        from app import application

        value = getattr(application, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'app' has no attribute {name!r}")

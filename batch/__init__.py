"""Stratum's batch layer: a PySpark job that rebuilds a model from the lake and publishes it.

Run it with ``python -m batch run`` (see :mod:`batch.__main__`). Importing this package is
cheap: Spark, torch and Kafka clients are imported by the submodules that need them, so that the
demo feed can use :mod:`demo.data` without them.
"""
from __future__ import annotations

__all__: list[str] = []

"""Everything a Stratum model is: network, shared preprocessing, manifest and registry I/O.

A plain library used by both the batch layer (training, publishing) and the serving layer
(loading, scoring). It depends on numpy, torch, scikit-learn (metrics) and fsspec/s3fs only,
never on Faust, Spark or ``app``. Submodules are imported lazily, so
``import models.preprocessing`` (needed inside Spark tasks) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ModelError", "ManifestError", "ArtifactError", "MessageError",
    "MLP", "Preprocessor", "fit_preprocessor", "preprocessor_from_stats",
    "Manifest", "Registry", "ModelRef", "LoadedModel",
]

_WHERE = {
    "ModelError": "errors", "ManifestError": "errors", "ArtifactError": "errors",
    "MessageError": "errors",
    "MLP": "network",
    "Preprocessor": "preprocessing", "fit_preprocessor": "preprocessing",
    "preprocessor_from_stats": "preprocessing",
    "Manifest": "manifest",
    "Registry": "registry", "ModelRef": "registry",
    "LoadedModel": "loaded",
}


def __getattr__(name: str) -> Any:
    try:
        module = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'models' has no attribute {name!r}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

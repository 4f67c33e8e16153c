"""A model version's manifest: what it is, how to feed it, how good it is, what files it has.

``manifest.json`` is the last file the registry writes into a version directory, so its presence
means the version is complete. It is plain JSON (no NaN: missing reference inputs are ``null``):

.. code-block:: json

    {"format_version": 1, "name": "default", "version": "20261123T140501Z-3fa2c1",
     "created_at": "2026-11-23T14:05:01Z", "parent_version": null, "forced": false,
     "features": ["DER_mass_MMC", "..."], "classes": ["b", "s"],
     "preprocessing": {"features": [...], "fill": [...], "mean": [...], "std": [...]},
     "architecture": {"type": "mlp", "n_features": 30, "n_classes": 2,
                      "hidden": [500, 1000, 500], "dropout": 0.4},
     "metrics": {"accuracy": 0.83, "log_loss": 0.38, "auc": 0.9, "n": 20000},
     "training": {"rows": 80000, "epochs": 5, "...": "..."},
     "reference": {"inputs": [[...], ...], "probabilities": [[...], ...], "atol": 0.0001},
     "files": {"model.pt": "<sha256>", "model.onnx": "<sha256>"}}
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np

from models.errors import ManifestError, ModelError
from models.preprocessing import Preprocessor
from transport.protocol import MANIFEST_FILE

__all__ = ["Manifest", "FORMAT_VERSION", "MANIFEST_FILE", "check_path_segment", "utc_now_iso"]

#: The manifest layout this code writes and the only one it reads.
FORMAT_VERSION = 1

_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED_METRICS = ("accuracy", "log_loss")


def check_path_segment(what: str, value: Any) -> str:
    """Return ``value`` if it can be one path segment of a registry URI, else raise.

    Names, versions and file names end up in S3 keys: no ``/``, no ``..``, no surprises.
    """
    if not isinstance(value, str) or not _SEGMENT_RE.match(value) or ".." in value:
        raise ManifestError(f"{what} {value!r} is not a valid name "
                            "(letters, digits, '.', '_', '-'; no '/' or '..')")
    return value


def utc_now_iso() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Manifest:
    """Everything the serving layer needs to know about one model version.

    The batch layer builds a draft (``version``, ``files`` and ``created_at`` empty) and
    :meth:`models.registry.Registry.publish` fills those in; :meth:`validate` checks the
    complete manifest.

    Attributes
    ----------
    name : str
        Model name (registry directory).
    features : list of str
        Ordered feature names: the column order of ``predict_proba`` input.
    classes : list of str or int
        Class labels in output order (column order of the probabilities).
    preprocessing : dict
        :meth:`models.preprocessing.Preprocessor.to_dict` output.
    architecture : dict
        :meth:`models.classifier.MLPClassifier.architecture` output.
    metrics : dict
        Held-out test split metrics: ``accuracy``, ``log_loss``, ``auc`` (two classes), ...
    training : dict
        Free-form facts about the run: rows, epochs, seconds, data URI, ...
    reference : dict
        ``inputs`` (raw rows, ``None`` = missing), ``probabilities`` (expected outputs) and
        ``atol``: a loader checks the weights reproduce them.
    version : str
        Version id, unique and sortable by time.
    files : dict
        ``{file name: sha256 hex}`` of every other file of the version.
    created_at : str
        ISO 8601 UTC time of publication.
    parent_version : str or None
        The version that was newest when this one was published.
    forced : bool
        True when the evaluation policy rejected the candidate and it was published anyway.
    format_version : int
        Manifest layout version.
    """

    name: str
    features: list[str]
    classes: list[Any]
    preprocessing: dict[str, Any]
    architecture: dict[str, Any]
    metrics: dict[str, float]
    training: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    files: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    parent_version: str | None = None
    forced: bool = False
    format_version: int = FORMAT_VERSION

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> "Manifest":
        """Check the whole manifest against the schema; return it, or raise ManifestError."""
        if self.format_version != FORMAT_VERSION:
            raise ManifestError(f"unsupported format_version {self.format_version!r} "
                                f"(this code reads {FORMAT_VERSION})")
        check_path_segment("model name", self.name)
        check_path_segment("version", self.version)
        self._validate_created_at()
        if self.parent_version is not None:
            check_path_segment("parent_version", self.parent_version)
        if not isinstance(self.forced, bool):
            raise ManifestError("'forced' must be true or false")
        self._validate_features_and_classes()
        self._validate_preprocessing()
        self._validate_architecture()
        self._validate_metrics()
        if not isinstance(self.training, dict):
            raise ManifestError("'training' must be an object")
        self._validate_reference()
        self._validate_files()
        return self

    def _validate_created_at(self) -> None:
        if not isinstance(self.created_at, str):
            raise ManifestError("'created_at' must be an ISO 8601 string")
        try:
            when = datetime.fromisoformat(self.created_at)
        except ValueError:
            raise ManifestError(f"'created_at' {self.created_at!r} is not ISO 8601") from None
        offset = when.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise ManifestError(f"'created_at' {self.created_at!r} must be in UTC")

    def _validate_features_and_classes(self) -> None:
        if not isinstance(self.features, list) or not self.features:
            raise ManifestError("'features' must be a non-empty list of names")
        if not all(isinstance(f, str) and f for f in self.features):
            raise ManifestError("'features' must hold non-empty strings")
        if len(set(self.features)) != len(self.features):
            raise ManifestError("'features' has duplicate names")
        if not isinstance(self.classes, list) or len(self.classes) < 2:
            raise ManifestError("'classes' must list at least two class labels")
        all_str = all(isinstance(c, str) for c in self.classes)
        all_int = all(isinstance(c, int) and not isinstance(c, bool) for c in self.classes)
        if not (all_str or all_int):
            raise ManifestError("'classes' must be all strings or all integers")
        if len(set(self.classes)) != len(self.classes):
            raise ManifestError("'classes' has duplicate labels")

    def _validate_preprocessing(self) -> None:
        try:
            prep = Preprocessor.from_dict(self.preprocessing)
        except ModelError as exc:
            raise ManifestError(f"'preprocessing': {exc}") from None
        if prep.features != self.features:
            raise ManifestError("'preprocessing' features differ from 'features'")

    def _validate_architecture(self) -> None:
        arch = self.architecture
        if not isinstance(arch, dict):
            raise ManifestError("'architecture' must be an object")
        if arch.get("type") != "mlp":
            raise ManifestError(f"'architecture' type {arch.get('type')!r} is not supported")
        if arch.get("n_features") != len(self.features):
            raise ManifestError(f"'architecture' n_features {arch.get('n_features')!r} != "
                                f"{len(self.features)} features")
        if arch.get("n_classes") != len(self.classes):
            raise ManifestError(f"'architecture' n_classes {arch.get('n_classes')!r} != "
                                f"{len(self.classes)} classes")
        hidden = arch.get("hidden")
        if not isinstance(hidden, list) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ManifestError("'architecture' hidden must be a list of positive integers")
        dropout = arch.get("dropout")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ManifestError("'architecture' dropout must be a number in [0, 1)")

    def _validate_metrics(self) -> None:
        if not isinstance(self.metrics, dict):
            raise ManifestError("'metrics' must be an object")
        required = list(_REQUIRED_METRICS) + (["auc"] if len(self.classes) == 2 else [])
        for key in required:
            if key not in self.metrics:
                raise ManifestError(f"'metrics' lacks {key!r}")
        for key, value in self.metrics.items():
            if not _is_number(value) or not math.isfinite(value):
                raise ManifestError(f"metric {key!r} must be a finite number, got {value!r}")

    def _validate_reference(self) -> None:
        ref = self.reference
        if not isinstance(ref, dict):
            raise ManifestError("'reference' must be an object")
        inputs, probs, atol = ref.get("inputs"), ref.get("probabilities"), ref.get("atol")
        if not isinstance(inputs, list) or not inputs:
            raise ManifestError("'reference' inputs must be a non-empty list of rows")
        if not isinstance(probs, list) or len(probs) != len(inputs):
            raise ManifestError("'reference' needs one probabilities row per input row")
        for row in inputs:
            if not isinstance(row, list) or len(row) != len(self.features) or not all(
                    v is None or _is_number(v) for v in row):
                raise ManifestError(f"'reference' input rows must hold {len(self.features)} "
                                    "numbers or nulls")
        for row in probs:
            if not isinstance(row, list) or len(row) != len(self.classes) or not all(
                    _is_number(v) and 0.0 <= v <= 1.0 for v in row):
                raise ManifestError(f"'reference' probability rows must hold "
                                    f"{len(self.classes)} numbers in [0, 1]")
        if atol is None or not _is_number(atol) or not 0 < atol < 1:
            raise ManifestError("'reference' atol must be a number in (0, 1)")

    def _validate_files(self) -> None:
        if not isinstance(self.files, dict) or not self.files:
            raise ManifestError("'files' must map at least one file name to its sha256")
        for name, digest in self.files.items():
            check_path_segment("file name", name)
            if name == MANIFEST_FILE:
                raise ManifestError(f"'files' must not list {MANIFEST_FILE}")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise ManifestError(f"'files' entry {name!r} is not a lowercase sha256 hex")

    # --------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (reference NaNs become ``None``)."""
        data = dataclasses.asdict(self)
        data["reference"] = dict(self.reference)
        if "inputs" in self.reference:
            data["reference"]["inputs"] = [
                [None if v is None or not math.isfinite(v) else float(v) for v in row]
                for row in self.reference["inputs"]]
        return data

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON bytes, exactly what the registry stores and hashes."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False).encode("utf-8") + b"\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Build and :meth:`validate` a manifest from a parsed JSON object."""
        if not isinstance(data, Mapping):
            raise ManifestError("manifest must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        # A complete manifest must carry every field, not only those without defaults.
        required |= {"version", "files", "created_at", "reference", "format_version"}
        absent = sorted(required - set(data))
        if absent:
            raise ManifestError(f"manifest lacks {', '.join(repr(a) for a in absent)}")
        # Unknown keys are ignored so a newer writer can add fields without breaking readers.
        manifest = cls(**{k: v for k, v in data.items() if k in names})
        return manifest.validate()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Manifest":
        """Parse and validate ``manifest.json`` bytes."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------------------- helpers
    def preprocessor(self) -> Preprocessor:
        """The :class:`~models.preprocessing.Preprocessor` these parameters describe."""
        return Preprocessor.from_dict(self.preprocessing)

    def reference_arrays(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Reference ``(inputs float64 with NaN, probabilities float64, atol)``."""
        inputs = np.array([[np.nan if v is None else v for v in row]
                           for row in self.reference["inputs"]], dtype=np.float64)
        probs = np.array(self.reference["probabilities"], dtype=np.float64)
        return inputs, probs, float(self.reference["atol"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

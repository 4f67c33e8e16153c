"""A model version's manifest: what it is, how to feed it, how good it is, what files it has.

``manifest.json`` is the last file the registry writes into a version directory, so its presence
means the version is complete. It is plain JSON (no NaN: missing reference inputs are ``null``):

.. code-block:: json

    {"format_version": 1, "name": "default", "version": "20261123T140501Z-3fa2c1",
     "created_at": "2026-11-23T14:05:01Z", "parent_version": null, "forced": false,
     "task": "classification", "features": ["DER_mass_MMC", "..."], "classes": ["b", "s"],
     "preprocessing": {"features": [...], "fill": [...], "mean": [...], "std": [...]},
     "architecture": {"type": "mlp", "n_features": 30, "n_outputs": 2,
                      "hidden": [500, 1000, 500], "dropout": 0.4},
     "metrics": {"accuracy": 0.83, "log_loss": 0.38, "auc": 0.9, "n": 20000},
     "training": {"rows": 80000, "epochs": 5, "...": "..."},
     "reference": {"inputs": [[...], ...], "outputs": [[...], ...], "atol": 0.0001},
     "files": {"model.pt": "<sha256>", "model.onnx": "<sha256>"}}

A regression has ``"task": "regression"``, no classes, one output, and ``rmse``, ``mae`` and
``r2`` among its metrics. A user's network has ``"architecture": {"type": "factory",
"factory": "package.module:function", "n_features", "n_outputs", "params": {...}}``.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Mapping

import msgspec
import numpy as np
from msgspec import Meta, Struct

from models.errors import ManifestError, ModelError
from models.preprocessing import Preprocessor
from transport.protocol import MANIFEST_FILE

__all__ = ["Manifest", "MLPArchitecture", "FactoryArchitecture", "Architecture", "Reference",
           "Task", "CLASSIFICATION", "REGRESSION", "REQUIRED_METRICS", "FORMAT_VERSION", "MANIFEST_FILE",
           "check_path_segment", "utc_now_iso"]

#: The manifest layout this code writes and the only one it reads.
FORMAT_VERSION = 1

_SEGMENT = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: Test metrics a manifest must carry, by task (and ``auc`` for two classes).
REQUIRED_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "log_loss"), "regression": ("rmse", "mae", "r2")}

#: What a model predicts: a class with its probabilities, or a number.
Task = Literal["classification", "regression"]
CLASSIFICATION: Task = "classification"
REGRESSION: Task = "regression"

#: One path segment of a registry URI: names, versions and file names end up in S3 keys.
Segment = Annotated[str, Meta(pattern=_SEGMENT, description="letters, digits, '.', '_', '-'")]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$", description="lowercase sha256 hex")]


def check_path_segment(what: str, value: Any) -> str:
    """Return ``value`` if it can be one path segment of a registry URI, else raise.

    Names, versions and file names end up in S3 keys: no ``/``, no ``..``, no surprises.
    """
    try:
        msgspec.convert(value, Segment)
    except msgspec.ValidationError:
        raise ManifestError(f"{what} {value!r} is not a valid name "
                            "(letters, digits, '.', '_', '-'; no '/' or '..')") from None
    if ".." in value:
        raise ManifestError(f"{what} {value!r} is not a valid name (no '..')")
    return str(value)


def utc_now_iso() -> str:
    """Current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class MLPArchitecture(Struct, tag_field="type", tag="mlp", omit_defaults=True):
    """The built-in network: :meth:`models.network.MLP.architecture`.

    ``n_outputs`` is the number of classes, or 1 for a regression; manifests written before
    regression existed call it ``n_classes``, which is read as ``n_outputs``."""

    n_features: Annotated[int, Meta(ge=1)]
    hidden: list[Annotated[int, Meta(ge=1)]]
    dropout: Annotated[float, Meta(ge=0.0, lt=1.0)]
    n_outputs: Annotated[int, Meta(ge=1)] = 0
    n_classes: int | None = None

    def __post_init__(self) -> None:
        if self.n_classes is not None:
            self.n_outputs, self.n_classes = self.n_classes, None


class FactoryArchitecture(Struct, tag_field="type", tag="factory"):
    """A user's network: ``factory(n_features, n_outputs, **params)`` builds it
    (:func:`models.network.build_network`)."""

    factory: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")]
    n_features: Annotated[int, Meta(ge=1)]
    n_outputs: Annotated[int, Meta(ge=1)]
    params: dict[str, Any] = {}


Architecture = MLPArchitecture | FactoryArchitecture


class Reference(Struct, omit_defaults=True):
    """Rows a loader feeds the weights, and the outputs they must reproduce within ``atol``:
    class probabilities, or the predicted value of a regression.

    ``inputs`` are raw rows (``None`` = missing; NaN is written as ``null``). Manifests written
    before regression existed call ``outputs`` ``probabilities``, read as ``outputs``."""

    inputs: Annotated[list[list[float | None]], Meta(min_length=1)]
    atol: Annotated[float, Meta(gt=0.0, lt=1.0)]
    outputs: list[list[float]] = []
    probabilities: list[list[float]] | None = None

    def __post_init__(self) -> None:
        if self.probabilities is not None:
            self.outputs, self.probabilities = self.probabilities, None


class Manifest(Struct, kw_only=True):
    """Everything the serving layer needs to know about one model version.

    The schema is the type annotations below, checked by msgspec when a manifest is read
    (:meth:`from_json`, :meth:`from_dict`) or :meth:`validate`\ d; the few rules that relate
    two fields are :meth:`_check_relations`. Unknown keys are ignored, so a newer writer can
    add fields without breaking readers.

    The batch layer builds a :meth:`draft` (``version``, ``files`` and ``created_at`` empty)
    and :meth:`models.registry.Registry.publish` fills those in and validates the result.

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
    architecture : MLPArchitecture
        How to rebuild the network the weights belong to.
    metrics : dict
        Held-out test split metrics: ``accuracy``, ``log_loss``, ``auc`` (two classes), ...
    training : dict
        Free-form facts about the run: rows, epochs, seconds, data URI, ...
    reference : Reference
        Rows whose outputs a loader checks the weights reproduce.
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

    format_version: int
    name: Segment
    version: Segment
    created_at: str
    parent_version: Segment | None = None
    forced: bool = False
    task: Task = CLASSIFICATION
    features: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]
    classes: list[str | int] = []
    preprocessing: dict[str, Any]
    architecture: Architecture
    metrics: dict[str, float]
    training: dict[str, Any] = {}
    reference: Reference
    files: Annotated[dict[Segment, Sha256], Meta(min_length=1)]

    @classmethod
    def draft(cls, *, name: str, features: list[str], classes: list[Any],
              preprocessing: dict[str, Any], architecture: Mapping[str, Any],
              metrics: dict[str, float], training: dict[str, Any] | None = None,
              reference: Mapping[str, Any] | None = None, forced: bool = False,
              task: Task = CLASSIFICATION) -> "Manifest":
        """A manifest before publication: no version, files or time yet, and not validated.

        ``architecture`` and ``reference`` are given as the JSON objects they are written as;
        the reference defaults to none (set it before publishing)."""
        try:
            arch = msgspec.convert(dict(architecture), Architecture)
            ref = (Reference(inputs=[], outputs=[], atol=1e-4) if reference is None
                   else msgspec.convert(dict(reference), Reference))
        except msgspec.ValidationError as exc:
            raise ManifestError(str(exc)) from None
        return cls(format_version=FORMAT_VERSION, name=name, version="", created_at="",
                   task=task, features=features, classes=classes, preprocessing=preprocessing,
                   architecture=arch, metrics=metrics, training=dict(training or {}),
                   reference=ref, files={}, forced=forced)

    @property
    def n_outputs(self) -> int:
        """Width of the network's output: the number of classes, or 1 for a regression."""
        return len(self.classes) if self.task == CLASSIFICATION else 1

    # ----------------------------------------------------------------------------- validation
    def validate(self) -> "Manifest":
        """Check the whole manifest against the schema; return it, or raise ManifestError."""
        return type(self).from_dict(msgspec.to_builtins(self, enc_hook=_plain))

    def _check_relations(self) -> "Manifest":
        """The rules a type annotation cannot say: they relate fields to each other."""
        if self.format_version != FORMAT_VERSION:
            raise ManifestError(f"unsupported format_version {self.format_version!r} "
                                f"(this code reads {FORMAT_VERSION})")
        for what, value in (("model name", self.name), ("version", self.version),
                            ("parent_version", self.parent_version), *(
                                ("file name", f) for f in self.files)):
            if value is not None:
                check_path_segment(what, value)
        self._check_created_at()
        if len(set(self.features)) != len(self.features):
            raise ManifestError("'features' has duplicate names")
        if self.task == CLASSIFICATION and len(self.classes) < 2:
            raise ManifestError("'classes' must list at least two class labels")
        if self.task == REGRESSION and self.classes:
            raise ManifestError("a regression has no 'classes'")
        if len({type(c) for c in self.classes}) > 1:
            raise ManifestError("'classes' must be all strings or all integers")
        if len(set(self.classes)) != len(self.classes):
            raise ManifestError("'classes' has duplicate labels")
        try:
            prep = Preprocessor.from_dict(self.preprocessing)
        except ModelError as exc:
            raise ManifestError(f"'preprocessing': {exc}") from None
        if prep.features != self.features:
            raise ManifestError("'preprocessing' features differ from 'features'")
        arch = self.architecture
        if arch.n_features != len(self.features):
            raise ManifestError(f"'architecture' n_features {arch.n_features} != "
                                f"{len(self.features)} features")
        if arch.n_outputs != self.n_outputs:
            raise ManifestError(f"'architecture' n_outputs {arch.n_outputs} != "
                                f"{self.n_outputs} ({self.task} with {len(self.classes)} "
                                "classes)")
        required = list(REQUIRED_METRICS[self.task]) + (
            ["auc"] if self.task == CLASSIFICATION and len(self.classes) == 2 else [])
        for key in required:
            if key not in self.metrics:
                raise ManifestError(f"'metrics' lacks {key!r}")
        for key, figure in self.metrics.items():
            if not math.isfinite(figure):
                raise ManifestError(f"metric {key!r} must be a finite number, got {figure!r}")
        ref = self.reference
        if len(ref.outputs) != len(ref.inputs):
            raise ManifestError("'reference' needs one outputs row per input row")
        if any(len(row) != len(self.features) for row in ref.inputs):
            raise ManifestError(f"'reference' input rows must hold {len(self.features)} "
                                "numbers or nulls")
        if any(len(row) != self.n_outputs or not all(math.isfinite(v) for v in row)
               for row in ref.outputs):
            raise ManifestError(f"'reference' output rows must hold {self.n_outputs} finite "
                                "numbers")
        if self.task == CLASSIFICATION and not all(
                0.0 <= v <= 1.0 for row in ref.outputs for v in row):
            raise ManifestError("'reference' outputs of a classification are probabilities: "
                                "numbers in [0, 1]")
        if MANIFEST_FILE in self.files:
            raise ManifestError(f"'files' must not list {MANIFEST_FILE}")
        return self

    def _check_created_at(self) -> None:
        try:
            when = datetime.fromisoformat(self.created_at)
        except ValueError:
            raise ManifestError(f"'created_at' {self.created_at!r} is not ISO 8601") from None
        offset = when.utcoffset()
        if offset is None or offset.total_seconds() != 0:
            raise ManifestError(f"'created_at' {self.created_at!r} must be in UTC")

    # --------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (reference NaNs become ``None``)."""
        data: dict[str, Any] = msgspec.json.decode(_ENCODER.encode(self))
        return data

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON bytes, exactly what the registry stores and hashes.

        A NaN (a missing reference input) is written as ``null``."""
        return msgspec.json.format(_ENCODER.encode(self), indent=2) + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Build and :meth:`validate` a manifest from a parsed JSON object."""
        try:
            manifest = msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ManifestError(str(exc)) from None
        return manifest._check_relations()

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Manifest":
        """Parse and validate ``manifest.json`` bytes."""
        try:
            manifest = msgspec.json.decode(raw, type=cls)
        except msgspec.ValidationError as exc:
            raise ManifestError(str(exc)) from None
        except msgspec.DecodeError as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        return manifest._check_relations()

    # ------------------------------------------------------------------------------- helpers
    def preprocessor(self) -> Preprocessor:
        """The :class:`~models.preprocessing.Preprocessor` these parameters describe."""
        return Preprocessor.from_dict(self.preprocessing)

    def architecture_dict(self) -> dict[str, Any]:
        """The architecture as the JSON object it is written as."""
        data: dict[str, Any] = msgspec.to_builtins(self.architecture)
        return data

    def reference_arrays(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Reference ``(inputs float64 with NaN, outputs float64, atol)``."""
        inputs = np.array([[np.nan if v is None else v for v in row]
                           for row in self.reference.inputs], dtype=np.float64)
        outputs = np.array(self.reference.outputs, dtype=np.float64)
        return inputs, outputs, float(self.reference.atol)


def _plain(value: Any) -> Any:
    """The plain JSON value of what a run records in free-form fields: numpy scalars and
    arrays, and ``str`` subclasses such as ``torch.__version__``."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise NotImplementedError(f"cannot write {type(value).__name__} into a manifest")


_ENCODER = msgspec.json.Encoder(enc_hook=_plain)

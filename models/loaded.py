"""A loaded, verified model version ready to score raw feature vectors."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from torch import nn

from models.errors import ArtifactError, ModelError
from models.manifest import CLASSIFICATION, Manifest
from models.network import output_layer

__all__ = ["LoadedModel"]

log = logging.getLogger(__name__)


class LoadedModel:
    """A model version in memory: manifest, preprocessing and network in eval mode.

    Built by :meth:`models.registry.Registry.load` after every check passed; the batch job also
    builds one around a freshly trained network so that the reference probabilities it records
    come from exactly the code path that serves.

    Parameters
    ----------
    manifest : Manifest
        The version's (validated) manifest.
    module : torch.nn.Module
        The network with its weights loaded (:class:`models.network.MLP` or a factory's).
    manifest_uri, sha256 : str, optional
        Where the manifest was read from and the sha256 of its bytes.

    Attributes
    ----------
    name, version : str
        Model name and version id (``<base_version>+<update_seq>`` once an update applies).
    base_version : str
        The published version (manifest version).
    update_seq : int
        Sequence number of the applied speed-layer update, 0 for the base version itself.
    features : list of str
        Ordered feature names: the column order :meth:`predict_proba` expects.
    task : str
        ``"classification"`` or ``"regression"``.
    classes : list of str or int
        Class labels: the column order of the probabilities (none for a regression).
    metrics : dict
        Held-out test metrics recorded at training time.
    """

    def __init__(self, manifest: Manifest, module: nn.Module,
                 manifest_uri: str | None = None, sha256: str | None = None) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        #: The published version this model is (or, with an update applied, derives from).
        self.base_version = manifest.version
        #: ``seq`` of the speed-layer update applied on top of the base version (0: none).
        self.update_seq = 0
        self.features: list[str] = list(manifest.features)
        self.task = manifest.task
        self.classes: list[Any] = list(manifest.classes)
        self.n_outputs = manifest.n_outputs
        self.metrics: dict[str, float] = dict(manifest.metrics)
        self.manifest_uri = manifest_uri
        self.sha256 = sha256
        self.preprocessor = manifest.preprocessor()
        # Dropout must be off for scoring; eval() is what turns it off.
        self.module = module.eval()
        self._output_layer: tuple[str, nn.Linear] | None = None

    def output_layer(self) -> tuple[str, nn.Linear]:
        """The network's output layer and its name (:func:`models.network.output_layer`),
        found once; raises :class:`ModelError` when the network does not end in one."""
        if self._output_layer is None:
            self._output_layer = output_layer(self.module, self.n_features)
        return self._output_layer

    @property
    def n_features(self) -> int:
        """Input width."""
        return len(self.features)

    def outputs(self, X: np.ndarray) -> np.ndarray:
        """What the model says of raw feature rows: class probabilities (classification) or
        the predicted value (regression).

        Parameters
        ----------
        X : numpy.ndarray
            ``(n, n_features)`` raw values in :attr:`features` order (float64; NaN, +/-inf and
            ``-999.0`` are missing). A single ``(n_features,)`` row is accepted too.

        Returns
        -------
        numpy.ndarray
            ``(n, n_outputs)`` float32: softmax probabilities with columns in :attr:`classes`
            order, or one column of predicted values.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"expected shape (n, {self.n_features}), got {X.shape}")
        if X.shape[0] == 0:
            return np.empty((0, self.n_outputs), dtype=np.float32)
        inputs = torch.from_numpy(self.preprocessor.transform(X))
        with torch.inference_mode():
            out = self.module(inputs)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(X), self.n_outputs):
                raise ModelError(f"{self.name}/{self.version}: the network returned "
                                 f"{getattr(out, 'shape', type(out).__name__)}, expected "
                                 f"({len(X)}, {self.n_outputs})")
            if self.task == CLASSIFICATION:
                out = torch.softmax(out, dim=1)
        result: np.ndarray = out.float().numpy()
        return result

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities for raw feature rows (:meth:`outputs` of a classification)."""
        if self.task != CLASSIFICATION:
            raise ModelError(f"{self.name}/{self.version} is a {self.task}: it has no class "
                             "probabilities")
        return self.outputs(X)

    def predict(self, X: np.ndarray) -> list[Any]:
        """Most probable class label, or predicted value, of each row."""
        out = self.outputs(X)
        if self.task == CLASSIFICATION:
            return [self.classes[i] for i in out.argmax(axis=1)]
        return [float(v) for v in out[:, 0]]

    def check_reference(self) -> None:
        """Raise :class:`ArtifactError` unless the manifest's reference rows reproduce."""
        inputs, expected, atol = self.manifest.reference_arrays()
        try:
            got = self.outputs(inputs).astype(np.float64)
        except ModelError as exc:
            raise ArtifactError(str(exc)) from None
        if got.shape != expected.shape:
            raise ArtifactError(f"reference output shape {got.shape} != {expected.shape}")
        # Values are compared relative to their size: a regression's may be in the thousands.
        worst = float(np.max(np.abs(got - expected) / np.maximum(1.0, np.abs(expected))))
        if not worst <= atol:  # also catches NaN
            raise ArtifactError(f"weights do not reproduce the reference outputs of "
                                f"{self.name}/{self.version}: max difference {worst:.3g} "
                                f"> atol {atol:.3g}")

    def __repr__(self) -> str:
        return (f"LoadedModel(name={self.name!r}, version={self.version!r}, "
                f"features={self.n_features}, classes={self.classes!r})")

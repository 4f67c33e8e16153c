"""A loaded, verified model version ready to score raw feature vectors."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from models.classifier import MLPClassifier
from models.errors import ArtifactError, ModelError
from models.manifest import Manifest

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
    module : MLPClassifier
        The network with its weights loaded.
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
    classes : list of str or int
        Class labels: the column order of the probabilities.
    metrics : dict
        Held-out test metrics recorded at training time.
    """

    def __init__(self, manifest: Manifest, module: MLPClassifier,
                 manifest_uri: str | None = None, sha256: str | None = None) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.version = manifest.version
        #: The published version this model is (or, with an update applied, derives from).
        self.base_version = manifest.version
        #: ``seq`` of the speed-layer update applied on top of the base version (0: none).
        self.update_seq = 0
        self.features: list[str] = list(manifest.features)
        self.classes: list[Any] = list(manifest.classes)
        self.metrics: dict[str, float] = dict(manifest.metrics)
        self.manifest_uri = manifest_uri
        self.sha256 = sha256
        self.preprocessor = manifest.preprocessor()
        if module.n_features != len(self.features) or module.n_classes != len(self.classes):
            raise ModelError(f"network is {module.n_features}->{module.n_classes}, manifest "
                             f"says {len(self.features)}->{len(self.classes)}")
        # Dropout must be off for scoring; eval() is what turns it off.
        self.module = module.eval()

    @property
    def n_features(self) -> int:
        """Input width."""
        return len(self.features)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities for raw feature rows.

        Parameters
        ----------
        X : numpy.ndarray
            ``(n, n_features)`` raw values in :attr:`features` order (float64; NaN, +/-inf and
            ``-999.0`` are missing). A single ``(n_features,)`` row is accepted too.

        Returns
        -------
        numpy.ndarray
            ``(n, n_classes)`` float32 softmax probabilities, columns in :attr:`classes` order.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ModelError(f"expected shape (n, {self.n_features}), got {X.shape}")
        if X.shape[0] == 0:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        inputs = torch.from_numpy(self.preprocessor.transform(X))
        with torch.inference_mode():
            probs = torch.softmax(self.module(inputs), dim=1)
        return probs.numpy()

    def predict(self, X: np.ndarray) -> list[Any]:
        """Most probable class label of each row (see :meth:`predict_proba`)."""
        idx = self.predict_proba(X).argmax(axis=1)
        return [self.classes[i] for i in idx]

    def check_reference(self) -> None:
        """Raise :class:`ArtifactError` unless the manifest's reference rows reproduce."""
        inputs, expected, atol = self.manifest.reference_arrays()
        got = self.predict_proba(inputs).astype(np.float64)
        if got.shape != expected.shape:
            raise ArtifactError(f"reference output shape {got.shape} != {expected.shape}")
        worst = float(np.max(np.abs(got - expected)))
        if not worst <= atol:  # also catches NaN
            raise ArtifactError(f"weights do not reproduce the reference probabilities of "
                                f"{self.name}/{self.version}: max difference {worst:.3g} "
                                f"> atol {atol:.3g}")

    def __repr__(self) -> str:
        return (f"LoadedModel(name={self.name!r}, version={self.version!r}, "
                f"features={self.n_features}, classes={self.classes!r})")

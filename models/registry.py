"""The model registry: immutable, versioned model directories on S3 (or any fsspec store).

Layout: ``REGISTRY_URI/<model>/<version>/`` holds the weights (``model.pt``, a ``state_dict``
saved with :func:`torch.save`), optionally ``model.onnx`` (the same network exported to ONNX:
input ``x`` = preprocessed float32 rows, output ``logits``) and ``manifest.json``, which is
written last: a version without a manifest is incomplete and invisible. Versions are never
overwritten.

The batch layer publishes a version and announces its :class:`~transport.protocol.ModelRef`
(the ``MODEL-REF`` message, defined in :mod:`transport.protocol`) on the update topic; a reader
loads what the reference says with every check, :meth:`Registry.load_ref`, which also refuses a
reference whose manifest is another version than it names:

>>> registry = Registry(settings.registry_uri, settings.storage_options)  # doctest: +SKIP
>>> ref = ModelRef.from_message(json.loads(value))                         # doctest: +SKIP
>>> model = registry.load_ref(ref)                                         # doctest: +SKIP
"""
from __future__ import annotations

import io
import json
import logging
import re
import secrets
import warnings
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Collection, Mapping

import fsspec
import msgspec
import torch
from torch import nn

from models.network import build_network
from models.errors import ArtifactError, ManifestError, ModelError
from models.manifest import MANIFEST_FILE, Manifest, check_path_segment, utc_now_iso
from models.loaded import LoadedModel
from models.storage import ensure_bucket, filesystem, sha256_hex
from transport.protocol import ModelRef

__all__ = ["Registry", "ModelRef", "new_version", "WEIGHTS_FILE", "ONNX_FILE"]

log = logging.getLogger(__name__)

#: File name of the weights (a ``state_dict``) inside a version directory.
WEIGHTS_FILE = "model.pt"
#: File name of the optional ONNX export.
ONNX_FILE = "model.onnx"

_VERSION_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_VERSION_RE = re.compile(r"^(\d{8}T\d{6}Z)-[0-9a-f]{6}$")


def new_version(now: datetime | None = None, after: str | None = None) -> str:
    """A fresh version id ``YYYYMMDDTHHMMSSZ-<6 hex>``, sortable by time.

    Parameters
    ----------
    now : datetime, optional
        Time to encode (default: now, UTC).
    after : str, optional
        The newest existing version: the new id's time is moved past it if needed, so that
        versions published within one second (or under clock skew) still sort after it.
    """
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
    if after is not None:
        match = _VERSION_RE.match(after)
        if match:
            previous = datetime.strptime(match.group(1), _VERSION_TIME_FORMAT).replace(
                tzinfo=timezone.utc)
            now = max(now, previous + timedelta(seconds=1))
    return f"{now.strftime(_VERSION_TIME_FORMAT)}-{secrets.token_hex(3)}"


class Registry:
    """Publish and load model versions under one registry root.

    Parameters
    ----------
    uri : str
        Registry root, ``s3://bucket/prefix`` or ``file:///path``.
    storage_options : mapping, optional
        s3fs options (``Settings.storage_options``); ignored for local paths.
    """

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None,
                 factories: Collection[str] = ()) -> None:
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        #: Model factories a manifest may name (:func:`models.network.build_network`).
        self.factories = frozenset(factories)
        self._fs, self._root = filesystem(self.uri, self.storage_options)

    def __repr__(self) -> str:
        return f"Registry({self.uri!r})"

    # ---------------------------------------------------------------------------- addressing
    def _dir(self, name: str, version: str) -> str:
        return f"{self._root}/{name}/{version}"

    def manifest_uri(self, name: str, version: str) -> str:
        """Full URI of ``manifest.json`` of ``name``/``version``."""
        return str(self._fs.unstrip_protocol(f"{self._dir(name, version)}/{MANIFEST_FILE}"))

    # ------------------------------------------------------------------------------- listing
    def versions(self, name: str) -> list[str]:
        """Complete versions of model ``name`` (those with a manifest), oldest first.

        Raises
        ------
        ArtifactError
            The registry cannot be listed (store unreachable, access denied, ...).
        """
        check_path_segment("model name", name)
        prefix = f"{self._root}/{name}"
        try:
            paths = self._fs.find(prefix)
        except FileNotFoundError:
            return []
        except Exception as exc:  # botocore/aiohttp errors have no common base class
            raise ArtifactError(f"cannot list registry {self.uri}/{name}: "
                                f"{_describe(exc)}") from exc
        found = set()
        for path in paths:
            rest = path[len(prefix):].strip("/").split("/")
            if len(rest) == 2 and rest[1] == MANIFEST_FILE:
                found.add(rest[0])
        return sorted(found)

    def ref(self, name: str, version: str) -> ModelRef:
        """The :class:`ModelRef` of a complete version (reads its manifest)."""
        uri = self.manifest_uri(name, version)
        raw = self._read(uri, "manifest")
        try:
            metrics = json.loads(raw).get("metrics", {})
        except (ValueError, AttributeError):
            raise ArtifactError(f"manifest {uri} is not a JSON object") from None
        return ModelRef(name=name, version=version, manifest_uri=uri, sha256=sha256_hex(raw),
                        metrics=metrics if isinstance(metrics, dict) else {})

    def latest(self, name: str) -> ModelRef | None:
        """The newest complete version of ``name``, or None when there is none."""
        for version in reversed(self.versions(name)):
            try:
                return self.ref(name, version)
            except ArtifactError as exc:
                log.warning("skipping unreadable version %s/%s: %s", name, version, exc)
        return None

    # ---------------------------------------------------------------------------- publishing
    def publish(self, module: nn.Module, manifest: Manifest, *, onnx: bool = True,
                before_manifest: Callable[[], None] | None = None) -> ModelRef:
        """Write a new immutable version: every file first, ``manifest.json`` last.

        Parameters
        ----------
        module : torch.nn.Module
            The trained network.
        manifest : Manifest
            A draft: everything but ``version``, ``files`` and ``created_at``, which are
            filled in here (as is ``parent_version`` when empty: the newest existing version).
            Its reference rows must reproduce with ``module`` (checked before writing).
        onnx : bool
            Also write ``model.onnx``; an export failure is logged, not fatal.
        before_manifest : callable, optional
            Called once every other file is written, right before ``manifest.json``; whatever
            it raises stops the publication (the files written are removed) and propagates.

        Returns
        -------
        ModelRef
            Reference to the new version, ready for :meth:`ModelRef.to_message`.

        Raises
        ------
        ArtifactError
            The manifest is invalid, the weights do not reproduce the reference rows, the
            version exists already, or the store cannot be written.
        """
        name = check_path_segment("model name", manifest.name)
        existing = self.versions(name)
        parent = manifest.parent_version or (existing[-1] if existing else None)
        version = new_version(after=existing[-1] if existing else None)

        module = module.eval()
        files: dict[str, bytes] = {WEIGHTS_FILE: _state_dict_bytes(module)}
        if onnx:
            exported = _onnx_bytes(module, len(manifest.features),
                                   "logits" if manifest.task == "classification" else "outputs")
            if exported is not None:
                files[ONNX_FILE] = exported
        final = msgspec.structs.replace(
            manifest, version=version, parent_version=parent, created_at=utc_now_iso(),
            files={fname: sha256_hex(data) for fname, data in files.items()})
        try:
            final.validate()
        except ManifestError as exc:
            raise ArtifactError(f"refusing to publish an invalid manifest: {exc}") from None
        # Check the exact bytes about to be written reproduce the reference rows, so a
        # version that cannot load is never published.
        _loaded(final, files[WEIGHTS_FILE], where="candidate",
                factories=self.factories | _factory_of(final)).check_reference()
        manifest_bytes = final.to_json()

        directory = self._dir(name, version)
        manifest_path = f"{directory}/{MANIFEST_FILE}"
        try:
            ensure_bucket(self._fs, self._root)
            if self._fs.exists(manifest_path):
                raise ArtifactError(f"version {name}/{version} exists already; versions are "
                                    "immutable")
            # Local stores need the directory; on S3 this only ensures the bucket.
            self._fs.makedirs(directory, exist_ok=True)
            for fname, data in files.items():
                self._fs.pipe_file(f"{directory}/{fname}", data)
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(f"cannot write {self._fs.unstrip_protocol(directory)}: "
                                f"{_describe(exc)}") from exc
        if before_manifest is not None:
            try:
                before_manifest()
            except BaseException:
                self._remove_files(directory, list(files))
                raise
        try:
            self._fs.pipe_file(manifest_path, manifest_bytes)
        except Exception as exc:
            raise ArtifactError(f"cannot write {self._fs.unstrip_protocol(directory)}: "
                                f"{_describe(exc)}") from exc
        ref = ModelRef(name=name, version=version, manifest_uri=self.manifest_uri(name, version),
                       sha256=sha256_hex(manifest_bytes), metrics=dict(final.metrics))
        log.info("published %s/%s (%s)", name, version, ", ".join(
            f"{k}={v:.4g}" for k, v in final.metrics.items() if isinstance(v, float)))
        return ref

    # ------------------------------------------------------------------------------- loading
    def load(self, manifest_uri: str, sha256: str | None = None) -> LoadedModel:
        """Read, verify and load a model version.

        Checks, in order: the manifest's sha256 (when given), its schema, that it sits at
        ``<root>/<name>/<version>/`` of this registry, every file's sha256, the weights'
        shapes, and that the reference rows reproduce.

        Parameters
        ----------
        manifest_uri : str
            URI of ``manifest.json`` (``ModelRef.manifest_uri``).
        sha256 : str, optional
            Expected sha256 of the manifest bytes (``ModelRef.sha256``).

        Returns
        -------
        LoadedModel
            The verified model, in eval mode.

        Raises
        ------
        ArtifactError
            Any check fails; the message says which and why.
        """
        raw = self._read(manifest_uri, "manifest")
        digest = sha256_hex(raw)
        if sha256 is not None and digest != sha256:
            raise ArtifactError(f"manifest {manifest_uri} has sha256 {digest}, expected "
                                f"{sha256}: it changed after it was announced")
        try:
            manifest = Manifest.from_json(raw)
        except ManifestError as exc:
            raise ArtifactError(f"invalid manifest {manifest_uri}: {exc}") from None
        expected_uri = self.manifest_uri(manifest.name, manifest.version)
        if self._path_of(manifest_uri) != self._path_of(expected_uri):
            raise ArtifactError(f"manifest {manifest_uri} describes {manifest.name}/"
                                f"{manifest.version}, which belongs at {expected_uri}")
        if WEIGHTS_FILE not in manifest.files:
            raise ArtifactError(f"manifest {manifest_uri} lists no {WEIGHTS_FILE}")
        directory = self._dir(manifest.name, manifest.version)
        weights = b""
        for fname, expected in manifest.files.items():
            data = self._read(self._fs.unstrip_protocol(f"{directory}/{fname}"), fname)
            if sha256_hex(data) != expected:
                raise ArtifactError(f"{fname} of {manifest.name}/{manifest.version} has "
                                    f"sha256 {sha256_hex(data)}, manifest says {expected}: "
                                    "the file was modified or corrupted")
            if fname == WEIGHTS_FILE:
                weights = data
        model = _loaded(manifest, weights, where=manifest_uri, factories=self.factories,
                        manifest_uri=manifest_uri, sha256=digest)
        model.check_reference()
        log.info("loaded %s/%s from %s", manifest.name, manifest.version, manifest_uri)
        return model

    def load_ref(self, ref: ModelRef) -> LoadedModel:
        """:meth:`load` a :class:`ModelRef`, also checking its name and version."""
        model = self.load(ref.manifest_uri, sha256=ref.sha256)
        if (model.name, model.version) != (ref.name, ref.version):
            raise ArtifactError(f"MODEL-REF says {ref.name}/{ref.version} but the manifest "
                                f"is {model.name}/{model.version}")
        return model

    # ---------------------------------------------------------------------------- generations
    def delete_version(self, name: str, version: str) -> None:
        """Remove one version: its manifest first (the version disappears at once, as a whole),
        then the rest of its files.

        Raises
        ------
        ArtifactError
            The store cannot be written.
        """
        check_path_segment("model name", name)
        check_path_segment("version", version)
        directory = self._dir(name, version)
        try:
            if self._fs.exists(f"{directory}/{MANIFEST_FILE}"):
                self._fs.rm_file(f"{directory}/{MANIFEST_FILE}")
            if self._fs.exists(directory):
                self._fs.rm(directory, recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise ArtifactError(f"cannot delete {name}/{version}: {_describe(exc)}") from exc
        log.info("deleted %s/%s", name, version)

    def _remove_files(self, directory: str, names: list[str]) -> None:
        """Best-effort removal of a publication's files that never got their manifest."""
        for fname in names:
            try:
                self._fs.rm_file(f"{directory}/{fname}")
            except Exception as exc:  # a version without a manifest does not exist anyway
                log.warning("could not remove %s/%s: %s", directory, fname, _describe(exc))

    def prune(self, name: str, keep: int, protect: "set[str] | frozenset[str]" = frozenset()
              ) -> list[str]:
        """Delete all but the newest ``keep`` complete versions of ``name``.

        Parameters
        ----------
        name : str
            Model name.
        keep : int
            Generations to keep; 0 or less keeps everything.
        protect : set of str
            Versions never deleted whatever their age: the active and the pinned one.

        Returns
        -------
        list of str
            The deleted versions, oldest first.
        """
        if keep <= 0:
            return []
        versions = self.versions(name)
        kept = set(versions[-keep:]) | set(protect)
        doomed = [v for v in versions if v not in kept]
        for version in doomed:
            self.delete_version(name, version)
        return doomed

    # ------------------------------------------------------------------------------ internals
    def _path_of(self, uri: str) -> str:
        protocol = fsspec.core.split_protocol(uri)[0] or "file"
        own = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        if protocol not in own and not (protocol == "file" and "local" in own):
            raise ArtifactError(f"{uri} is not on this registry's store ({self.uri})")
        return str(self._fs._strip_protocol(uri)).rstrip("/")

    def _read(self, uri: str, what: str) -> bytes:
        path = self._path_of(uri)
        root = self._root.rstrip("/") + "/"
        if not path.startswith(root):
            raise ArtifactError(f"{uri} is outside the registry {self.uri}")
        try:
            return bytes(self._fs.cat_file(path))
        except FileNotFoundError:
            raise ArtifactError(f"{what} {uri} does not exist") from None
        except Exception as exc:
            raise ArtifactError(f"cannot read {what} {uri}: {_describe(exc)}") from exc


def _state_dict_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def _onnx_bytes(module: nn.Module, n_features: int, output: str) -> bytes | None:
    """ONNX export of ``module`` (input ``x``, output ``output``, dynamic batch), or None."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter works offline; the dynamo one needs onnxscript.
            torch.onnx.export(module, (torch.zeros(1, n_features),),
                              buffer,  # type: ignore[arg-type]  # a file object works too
                              input_names=["x"], output_names=[output],
                              dynamic_axes={"x": {0: "n"}, output: {0: "n"}},
                              dynamo=False)
    except Exception as exc:  # optional artifact: never fail a publication over it
        log.warning("skipping ONNX export: %s", _describe(exc))
        return None
    return buffer.getvalue()


def _factory_of(manifest: Manifest) -> frozenset[str]:
    """The factory a manifest names, if any: a publisher may call the one it trained with."""
    factory = getattr(manifest.architecture, "factory", None)
    return frozenset([factory]) if factory else frozenset()


def _loaded(manifest: Manifest, weights: bytes, where: str, factories: Collection[str],
            manifest_uri: str | None = None, sha256: str | None = None) -> LoadedModel:
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"cannot read weights of {where}: {_describe(exc)}") from None
    try:
        module = build_network(manifest.architecture_dict(), factories)
    except ModelError as exc:
        raise ArtifactError(f"cannot build the network of {where}: {exc}") from None
    try:
        module.load_state_dict(state, strict=True)
        return LoadedModel(manifest, module, manifest_uri=manifest_uri, sha256=sha256)
    except (ModelError, RuntimeError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"weights of {where} do not fit the manifest's architecture: "
                            f"{_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    """One line: exception type and first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

"""Registry on file://: publish/load round trip, immutability, and refusal of damaged versions."""
from __future__ import annotations

from app.errors import StratumError

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.network import MLP, build_network
from models.errors import ArtifactError, MessageError, ModelError
from models.manifest import Manifest, Reference
from models.preprocessing import MISSING_MARKER, fit_preprocessor
from models.registry import ModelRef, Registry, new_version
from models.loaded import LoadedModel

FEATURES = ["f0", "f1", "f2", "f3"]


def make_candidate(classes: list[Any] | None = None, seed: int = 0
                   ) -> tuple[MLP, Manifest]:
    """A small network with a complete draft manifest, as the batch job builds it."""
    classes = classes or ["b", "s"]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    X = rng.normal(size=(200, len(FEATURES)))
    X[rng.random(X.shape) < 0.1] = MISSING_MARKER
    module = MLP(len(FEATURES), len(classes), hidden=(8, 4), dropout=0.2).eval()
    metrics = {"accuracy": 0.75, "log_loss": 0.5}
    if len(classes) == 2:
        metrics["auc"] = 0.8
    draft = Manifest.draft(name="default", features=FEATURES, classes=classes,
                           preprocessing=fit_preprocessor(FEATURES, X).to_dict(),
                           architecture=module.architecture(), metrics=metrics,
                           training={"rows": 200})
    reference = X[:6].copy()
    reference[0, 0] = np.nan
    draft.reference = Reference(
        inputs=reference.tolist(),
        outputs=LoadedModel(draft, module).predict_proba(reference).tolist(), atol=1e-5)
    return module, draft


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return Registry(f"file://{tmp_path}/registry", {"key": "ignored-for-local-paths"})


def version_dir(registry: Registry, ref: ModelRef) -> Path:
    return Path(registry.manifest_uri(ref.name, ref.version)[len("file://"):]).parent


def test_publish_then_load_gives_the_same_predictions(registry: Registry) -> None:
    module, draft = make_candidate()
    ref = registry.publish(module, draft)
    loaded = registry.load(ref.manifest_uri, sha256=ref.sha256)
    assert (loaded.name, loaded.version) == ("default", ref.version)
    assert loaded.features == FEATURES and loaded.classes == ["b", "s"]
    assert loaded.metrics == draft.metrics == ref.metrics
    X = np.random.default_rng(5).normal(size=(33, 4))
    X[0] = MISSING_MARKER
    X[1, 2] = np.nan
    expected = LoadedModel(draft, module).predict_proba(X)
    np.testing.assert_allclose(loaded.predict_proba(X), expected, atol=1e-6)
    files = sorted(p.name for p in version_dir(registry, ref).iterdir())
    assert files == ["manifest.json", "model.onnx", "model.pt"]
    manifest = json.loads((version_dir(registry, ref) / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "model.onnx"}
    assert manifest["parent_version"] is None and manifest["created_at"].endswith("Z")


def test_versions_are_sorted_unique_and_point_at_their_parent(registry: Registry) -> None:
    assert registry.versions("default") == [] and registry.latest("default") is None
    refs = [registry.publish(*make_candidate(seed=i), onnx=False) for i in range(3)]
    assert registry.versions("default") == [r.version for r in refs]
    assert len({r.version for r in refs}) == 3
    assert registry.latest("default") == refs[-1]
    third = registry.load_ref(refs[2])
    assert third.manifest.parent_version == refs[1].version


def test_a_version_without_manifest_is_invisible(registry: Registry, tmp_path: Path) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    partial = version_dir(registry, ref).parent / new_version(after=ref.version)
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"half written")
    assert registry.versions("default") == [ref.version]
    assert registry.latest("default") == ref


def test_new_version_sorts_after_a_version_from_the_same_second() -> None:
    first = new_version()
    assert all(new_version(after=first) > first for _ in range(20))


def test_tampered_weights_are_refused(registry: Registry) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    weights = version_dir(registry, ref) / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-20] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.pt .* modified or corrupted"):
        registry.load(ref.manifest_uri, sha256=ref.sha256)


def test_a_missing_file_is_refused(registry: Registry) -> None:
    ref = registry.publish(*make_candidate())
    (version_dir(registry, ref) / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx .* does not exist"):
        registry.load(ref.manifest_uri, sha256=ref.sha256)


def test_a_wrong_manifest_sha_is_refused(registry: Registry) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    with pytest.raises(ArtifactError, match="changed after it was announced"):
        registry.load(ref.manifest_uri, sha256="f" * 64)


def test_weights_that_do_not_reproduce_the_reference_are_refused(registry: Registry) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    path = version_dir(registry, ref) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["reference"]["outputs"][0] = [0.0, 1.0]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not reproduce the reference"):
        registry.load(ref.manifest_uri)  # no sha: only the reference check can notice


def test_weights_of_another_architecture_are_refused(registry: Registry) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    path = version_dir(registry, ref) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["architecture"]["hidden"] = [8, 5]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not fit the manifest's architecture"):
        registry.load(ref.manifest_uri)


def test_an_invalid_manifest_is_refused_with_the_reason(registry: Registry) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    path = version_dir(registry, ref) / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["features"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError,
                       match="invalid manifest .*: Object missing required field `features`"):
        registry.load(ref.manifest_uri)


def test_a_manifest_outside_the_registry_is_refused(registry: Registry, tmp_path: Path
                                                    ) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    other = Registry(f"file://{tmp_path}/elsewhere")
    with pytest.raises(ArtifactError, match="outside the registry"):
        other.load(ref.manifest_uri)
    with pytest.raises(ArtifactError, match="not on this registry's store"):
        registry.load("s3://bucket/models/default/v/manifest.json")


def test_publish_refuses_a_candidate_that_does_not_match_its_reference(registry: Registry
                                                                        ) -> None:
    module, draft = make_candidate()
    draft.reference.outputs = [[0.5, 0.5]] * len(draft.reference.inputs)
    with pytest.raises(ArtifactError, match="reference"):
        registry.publish(module, draft)
    assert registry.versions("default") == []


def test_publish_refuses_an_invalid_draft(registry: Registry) -> None:
    module, draft = make_candidate()
    draft.metrics = {"accuracy": 0.9}
    with pytest.raises(ArtifactError, match="invalid manifest: 'metrics' lacks 'log_loss'"):
        registry.publish(module, draft)


def test_model_ref_message_round_trip(registry: Registry) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    message = json.loads(json.dumps(ref.to_message()))
    assert message["type"] == "MODEL-REF"
    assert set(message) == {"type", "model", "version", "manifest", "sha256", "metrics"}
    assert ModelRef.from_message(message) == ref


@pytest.mark.parametrize("change, reason", [
    ({"type": "UP"}, "not a MODEL-REF"),
    ({"version": None}, "'version' must be a non-empty string"),
    ({"model": "a/b"}, "not a valid name"),
    ({"manifest": "/local/manifest.json"}, "is not a URI"),
    ({"sha256": "XYZ"}, "64 lowercase hex"),
    ({"metrics": [1]}, "metrics must be an object"),
])
def test_model_ref_from_message_names_what_is_wrong(change: dict, reason: str) -> None:
    message = {"type": "MODEL-REF", "model": "default", "version": "v1",
               "manifest": "s3://b/models/default/v1/manifest.json", "sha256": "a" * 64,
               "metrics": {}}
    message.update(change)
    with pytest.raises(MessageError, match=reason):
        ModelRef.from_message(message)
    assert issubclass(MessageError, StratumError) and issubclass(ModelError, StratumError)


def test_predict_proba_shapes_types_and_missing_values() -> None:
    module, draft = make_candidate(classes=[0, 1, 2])
    model = LoadedModel(draft, module)
    for n in (1, 7, 512, 1024):
        proba = model.predict_proba(np.random.default_rng(n).normal(size=(n, 4)))
        assert proba.shape == (n, 3) and proba.dtype == np.float32
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    fill = np.array(draft.preprocessing["fill"])
    as_marker = model.predict_proba(np.full((1, 4), MISSING_MARKER))
    np.testing.assert_allclose(model.predict_proba(np.full(4, np.nan)), as_marker)
    np.testing.assert_allclose(model.predict_proba(fill[None, :]), as_marker, atol=1e-6)
    assert model.predict_proba(np.empty((0, 4))).shape == (0, 3)
    assert model.predict(np.zeros((2, 4)))[0] in (0, 1, 2)
    with pytest.raises(ModelError, match=r"shape \(n, 4\)"):
        model.predict_proba(np.zeros((2, 5)))


def test_predict_proba_is_deterministic_in_eval_mode() -> None:
    module, draft = make_candidate()
    model = LoadedModel(draft, module.train())  # LoadedModel must switch dropout off
    X = np.random.default_rng(3).normal(size=(64, 4))
    np.testing.assert_array_equal(model.predict_proba(X), model.predict_proba(X))


def test_the_mlp_rejects_nonsense_and_rebuilds_from_its_architecture() -> None:
    module = MLP(30, 2)
    assert module.architecture() == {"type": "mlp", "n_features": 30, "n_outputs": 2,
                                     "hidden": [500, 1000, 500], "dropout": 0.4}
    rebuilt = build_network(module.architecture())
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in module.parameters()]
    for args in ((0, 2), (3, 0)):
        with pytest.raises(ModelError):
            MLP(*args)
    with pytest.raises(ModelError, match="dropout"):
        MLP(3, 2, dropout=1.0)


def test_the_onnx_export_computes_the_same_logits(registry: Registry) -> None:
    ort = pytest.importorskip("onnxruntime")
    module, draft = make_candidate()
    ref = registry.publish(module, draft)
    session = ort.InferenceSession(str(version_dir(registry, ref) / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    X = draft.preprocessor().transform(np.random.default_rng(9).normal(size=(17, 4)))
    (logits,) = session.run(["logits"], {"x": X})
    with torch.inference_mode():
        expected = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_prune_keeps_the_newest_generations_and_every_protected_version(registry: Registry
                                                                          ) -> None:
    refs = [registry.publish(*make_candidate(seed=i), onnx=False) for i in range(5)]
    versions = [r.version for r in refs]
    assert registry.prune("default", keep=0) == []  # 0 keeps everything
    removed = registry.prune("default", keep=2, protect={versions[0]})
    assert removed == versions[1:3]
    assert registry.versions("default") == [versions[0], versions[3], versions[4]]
    assert not version_dir(registry, refs[1]).exists()
    # What is left still loads; a deleted version is refused with the reason.
    registry.load_ref(refs[0])
    with pytest.raises(ArtifactError, match="does not exist"):
        registry.load_ref(refs[1])


def test_deleting_a_version_removes_its_manifest_first(registry: Registry,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ref = registry.publish(*make_candidate(), onnx=False)
    fs = registry._fs
    removed: list[str] = []
    real_rm_file = fs.rm_file

    def failing_rm(path: str, *args: Any, **kwargs: Any) -> None:
        removed.append(path)
        raise OSError("store went away")

    # The manifest goes first: if the store fails right after, the version is already
    # incomplete (invisible), never a manifest pointing at missing weights.
    monkeypatch.setattr(fs, "rm_file", failing_rm)
    with pytest.raises(ArtifactError, match="cannot delete default/.*store went away"):
        registry.delete_version("default", ref.version)
    assert removed and removed[0].endswith("/manifest.json")
    monkeypatch.setattr(fs, "rm_file", real_rm_file)
    registry.delete_version("default", ref.version)
    assert registry.versions("default") == []

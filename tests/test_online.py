"""models.online without Kafka: the UP message, applying an update, and the learner."""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Callable

import msgspec
import numpy as np
import pytest
import torch

from models.network import MLP
from models.errors import MessageError, ModelError
from models.manifest import Manifest
from models.online import (ModelUpdate, OutputLayerLearner, apply_update, hidden_activations,
                           output_layer, recency_weights)
from models.preprocessing import fit_preprocessor
from models.loaded import LoadedModel

FEATURES = ["x0", "x1", "x2", "x3"]
CLASSES = ["neg", "pos"]


def make_model(hidden: tuple[int, ...] = (32, 16), seed: int = 0,
               X: np.ndarray | None = None, y: np.ndarray | None = None,
               epochs: int = 0, version: str = "20261123T000000Z-abcdef") -> LoadedModel:
    """A LoadedModel; trained on (X, y) for ``epochs`` when given."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X_fit = X if X is not None else rng.normal(size=(256, len(FEATURES)))
    preprocessor = fit_preprocessor(FEATURES, X_fit)
    module = MLP(len(FEATURES), len(CLASSES), hidden=hidden, dropout=0.0)
    if epochs and X is not None and y is not None:
        inputs = torch.from_numpy(preprocessor.transform(X))
        targets = torch.from_numpy(y.astype(np.int64))
        optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
        for _ in range(epochs):
            for i in torch.randperm(len(targets)).split(128):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(module(inputs[i]), targets[i]).backward()
                optimizer.step()
    manifest = msgspec.structs.replace(Manifest.draft(
        name="default", features=FEATURES, classes=CLASSES,
        preprocessing=preprocessor.to_dict(), architecture=module.architecture(),
        metrics={"accuracy": 0.5, "log_loss": 0.69, "auc": 0.5},
        reference={"inputs": [[0.0] * 4], "outputs": [[0.5, 0.5]], "atol": 0.5}),
        version=version)
    return LoadedModel(manifest, module)


def make_regression_model(hidden: tuple[int, ...] = (32, 16), seed: int = 0,
                          version: str = "20261123T000000Z-abcdef") -> LoadedModel:
    """An untrained regression LoadedModel: one output, no classes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    preprocessor = fit_preprocessor(FEATURES, rng.normal(size=(256, len(FEATURES))))
    module = MLP(len(FEATURES), 1, hidden=hidden, dropout=0.0)
    manifest = msgspec.structs.replace(Manifest.draft(
        name="default", features=FEATURES, classes=[], task="regression",
        preprocessing=preprocessor.to_dict(), architecture=module.architecture(),
        metrics={"rmse": 1.0, "mae": 0.8, "r2": 0.0},
        reference={"inputs": [[0.0] * 4], "outputs": [[0.0]], "atol": 0.5}), version=version)
    return LoadedModel(manifest, module)


def make_update(base: LoadedModel, seq: int = 1, seed: int = 1, **changes: Any) -> ModelUpdate:
    layer = output_layer(base)
    rng = np.random.default_rng(seed)
    fields: dict[str, Any] = dict(
        model=base.name, base_version=base.base_version, seq=seq,
        weight=rng.normal(size=tuple(layer.weight.shape)).astype(np.float32),
        bias=rng.normal(size=tuple(layer.bias.shape)).astype(np.float32),
        n_examples=120, created_at="2026-11-23T10:00:00Z",
        extra={"fit": {"accuracy_after": 0.9}})
    fields.update(changes)
    return ModelUpdate(**fields)


def test_message_round_trip_is_exact_and_json() -> None:
    model = make_model()
    update = make_update(model, seq=3)
    message = json.loads(json.dumps(update.to_message()))
    assert message["type"] == "UP" and message["layer"] == "output"
    assert message["base_version"] == model.version and message["seq"] == 3
    assert message["shape"] == [2, 16] and message["fit"] == {"accuracy_after": 0.9}
    weight = base64.b64decode(message["weight"])
    bias = base64.b64decode(message["bias"])
    assert message["sha256"] == hashlib.sha256(weight + bias).hexdigest()
    assert np.array_equal(np.frombuffer(weight, "<f4"), update.weight.ravel())
    back = ModelUpdate.from_message(message)
    assert (back.model, back.base_version, back.seq, back.n_examples, back.created_at) == (
        update.model, update.base_version, 3, 120, update.created_at)
    assert back.weight.dtype == np.float32 and back.weight.shape == (2, 16)
    assert np.array_equal(back.weight, update.weight) and np.array_equal(back.bias, update.bias)
    assert back.extra == {"fit": {"accuracy_after": 0.9}} and back.version == f"{model.version}+3"


def _altered(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(message: dict[str, Any]) -> None:
        if value is _DELETE:
            del message[field]
        else:
            message[field] = value
    return change


_DELETE = object()


def _nan_weight(message: dict[str, Any]) -> None:
    weight = np.frombuffer(base64.b64decode(message["weight"]), "<f4").copy()
    weight[0] = np.nan
    raw = weight.tobytes()
    message["weight"] = base64.b64encode(raw).decode()
    message["sha256"] = hashlib.sha256(raw + base64.b64decode(message["bias"])).hexdigest()


def _flipped_bit(message: dict[str, Any]) -> None:
    raw = bytearray(base64.b64decode(message["weight"]))
    raw[5] ^= 1
    message["weight"] = base64.b64encode(bytes(raw)).decode()


MALFORMED: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_altered("type", "MODEL-REF"), "not an UP"),
    (_altered("model", _DELETE), "'model' must be a non-empty string"),
    (_altered("model", "a/b"), "not a valid name"),
    (_altered("base_version", ""), "'base_version' must be a non-empty string"),
    (_altered("base_version", "../x"), "not a valid name"),
    (_altered("seq", 0), "'seq' must be an integer >= 1"),
    (_altered("seq", "1"), "'seq' must be an integer >= 1"),
    (_altered("seq", True), "'seq' must be an integer >= 1"),
    (_altered("layer", "hidden"), "'layer' must be 'output'"),
    (_altered("shape", [2]), "'shape' must be"),
    (_altered("shape", [0, 16]), "'shape' must be"),
    (_altered("shape", [2, 8]), "'weight' holds 128 bytes; shape says 16"),
    (_altered("shape", [2, "16"]), "'shape' must be"),
    (_altered("weight", 5), "'weight' must be a base64 string"),
    (_altered("weight", "@@not base64@@"), "'weight' is not valid base64"),
    (_altered("bias", base64.b64encode(b"\0" * 12).decode()), "'bias' holds 12 bytes"),
    (_altered("sha256", "A" * 64), "'sha256' must be 64 lowercase hex digits"),
    (_flipped_bit, "do not match their sha256"),
    (_nan_weight, "must be finite"),
    (_altered("n_examples", -1), "'n_examples' must be an integer >= 0"),
    (_altered("n_examples", 2.5), "'n_examples' must be an integer >= 0"),
    (_altered("created_at", "yesterday"), "'created_at' must be an ISO 8601 time"),
    (_altered("created_at", _DELETE), "'created_at' must be an ISO 8601 time"),
]


@pytest.mark.parametrize("change,reason", MALFORMED,
                         ids=[reason.split(" ")[0] + f"-{i}" for i, (_, reason)
                              in enumerate(MALFORMED)])
def test_every_malformed_field_is_refused_with_a_reason(
        change: Callable[[dict[str, Any]], None], reason: str) -> None:
    message = make_update(make_model()).to_message()
    change(message)
    with pytest.raises(MessageError) as caught:
        ModelUpdate.from_message(message)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_message_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(MessageError, match="UP must be a JSON object"):
        ModelUpdate.from_message(["UP"])  # type: ignore[arg-type]


def test_apply_update_leaves_the_base_untouched_and_names_the_chain() -> None:
    base = make_model()
    rows = np.random.default_rng(5).normal(size=(64, 4))
    before = base.predict_proba(rows)
    weight_before = output_layer(base).weight.detach().clone()
    update = make_update(base, seq=7)
    updated = apply_update(base, update)

    assert updated.version == f"{base.version}+7" and updated.update_seq == 7
    assert updated.base_version == base.base_version == base.version
    assert (base.version, base.update_seq) == ("20261123T000000Z-abcdef", 0)
    assert updated.manifest is base.manifest and updated.features == base.features
    assert updated.classes == base.classes and updated.preprocessor == base.preprocessor
    # The base still predicts exactly as before; the updated model uses the new layer.
    assert np.array_equal(base.predict_proba(rows), before)
    assert torch.equal(output_layer(base).weight, weight_before)
    H = torch.from_numpy(hidden_activations(base, rows))
    logits = H @ torch.from_numpy(update.weight).T + torch.from_numpy(update.bias)
    expected = torch.softmax(logits, dim=1).numpy()
    assert np.allclose(updated.predict_proba(rows), expected, atol=1e-6)
    assert not np.allclose(updated.predict_proba(rows), before, atol=1e-3)
    # Hidden layers are shared, not copied; the output layer is the update's own.
    assert updated.module.net[0] is base.module.net[0]
    assert output_layer(updated) is not output_layer(base)
    # An update of an update's chain applies to the base, not to the updated model.
    again = apply_update(base, make_update(base, seq=8, seed=3))
    assert again.version == f"{base.version}+8"
    assert np.allclose(updated.predict_proba(rows), expected, atol=1e-6)


def test_apply_update_refuses_another_base_model_or_shape() -> None:
    base = make_model()
    with pytest.raises(ModelError, match="is for base version other"):
        apply_update(base, make_update(base, base_version="other"))
    with pytest.raises(ModelError, match="cannot apply to 'default'"):
        apply_update(base, make_update(base, model="another"))
    with pytest.raises(ModelError, match="output layer of shape"):
        apply_update(base, make_update(base, weight=np.zeros((2, 8), np.float32)))
    with pytest.raises(ModelError, match="output layer of shape"):
        apply_update(base, make_update(base, bias=np.zeros(3, np.float32)))


def test_recency_weights_halve_every_half_life() -> None:
    w = recency_weights(5, half_life=2)
    assert w.sum() == pytest.approx(1.0)
    assert w[-1] / w[-3] == pytest.approx(2.0) and np.all(np.diff(w) > 0)


def boundary(n: int, angle: float, rng: np.random.Generator, noise: float = 0.05
             ) -> tuple[np.ndarray, np.ndarray]:
    """Points labelled by the side of a line through the origin at ``angle``, some flipped."""
    X = rng.normal(size=(n, len(FEATURES)))
    y = (X[:, 0] * np.cos(angle) + X[:, 1] * np.sin(angle) > 0).astype(np.int64)
    flip = rng.random(n) < noise
    y[flip] = 1 - y[flip]
    return X, y


def accuracy(model: LoadedModel, X: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict_proba(X).argmax(axis=1) == y).mean())


def test_learner_recovers_accuracy_after_the_boundary_turns() -> None:
    rng = np.random.default_rng(0)
    X, y = boundary(6000, np.pi / 4, rng)
    base = make_model(hidden=(256,), X=X, y=y, epochs=3)
    X_old, y_old = boundary(3000, np.pi / 4, rng)
    X_new, y_new = boundary(3000, -np.pi / 4, rng)  # turned by 90 degrees
    before_shift = accuracy(base, X_old, y_old)
    degraded = accuracy(base, X_new, y_new)
    assert before_shift > 0.88 and degraded < 0.65

    learner = OutputLayerLearner(base, capacity=3000, half_life=500)
    learner.add(*boundary(2000, np.pi / 4, rng))  # the buffer before the shift
    head = base
    for seq in range(1, 9):  # windows of 400 labelled examples after the shift
        learner.add(*boundary(400, -np.pi / 4, rng))
        update = learner.fit(head, seq=seq)
        head = apply_update(base, ModelUpdate.from_message(update.to_message()))
    assert head.version == f"{base.version}+8" and update.n_examples == 3000
    recovered = accuracy(head, X_new, y_new)
    assert recovered > before_shift - 0.03, (before_shift, degraded, recovered)
    assert update.extra["fit"]["log_loss_after"] <= update.extra["fit"]["log_loss_before"] + 1e-6
    assert update.extra["fit"]["from_version"] == f"{base.version}+7"
    stats = update.extra["statistics"]
    assert stats["features"] == FEATURES and stats["count"] == [3000] * 4
    assert all(abs(m) < 0.2 for m in stats["mean"])  # standard normal features


def test_learner_keeps_the_newest_examples_and_checks_its_input() -> None:
    base = make_model()
    learner = OutputLayerLearner(base, capacity=50)
    rng = np.random.default_rng(1)
    learner.add(rng.normal(size=(40, 4)), np.zeros(40, dtype=np.int64))
    learner.add(rng.normal(size=(30, 4)), np.ones(30, dtype=np.int64))
    assert learner.size == 50
    with pytest.raises(ModelError, match="class indexes"):
        learner.add(rng.normal(size=(1, 4)), np.array([2]))
    with pytest.raises(ModelError, match="3 rows but 2 labels"):
        learner.add(rng.normal(size=(3, 4)), np.array([0, 1]))
    other = make_model(version="20261124T000000Z-abcdef")
    with pytest.raises(ModelError, match="is not of base"):
        learner.fit(other, seq=1)
    with pytest.raises(ModelError, match="no labelled examples"):
        OutputLayerLearner(base).fit(base, seq=1)
    # Missing values (NaN, -999) are imputed by the base's preprocessing, not learned as is.
    X = rng.normal(size=(20, 4))
    X[0, 1], X[1, 2] = np.nan, -999.0
    learner.add(X, np.ones(20, dtype=np.int64))
    update = learner.fit(base, seq=1)
    assert np.isfinite(update.weight).all() and update.extra["statistics"]["count"][1] == 49


def test_refit_goes_on_with_the_process_learner_unless_sent_the_base() -> None:
    """The learning process keeps its examples between refits; a learner that lost its
    partition sends the base again at its next refit, which starts without the old ones."""
    from models import online

    base = make_model()
    rng = np.random.default_rng(0)

    def examples(n: int) -> tuple[np.ndarray, np.ndarray]:
        X = rng.normal(size=(n, len(FEATURES)))
        return X, (X[:, 0] > 0).astype(np.int64)

    saved = online._process_learner
    try:
        online._process_learner = None
        with pytest.raises(online.BaseNotHeld):
            online.refit(None, base.version, 1000, 100.0, None, *examples(10), 1)
        assert online.refit(base, base.version, 1000, 100.0, None, *examples(30), 1
                            ).n_examples == 30
        assert online.refit(None, base.version, 1000, 100.0, None, *examples(20), 2
                            ).n_examples == 50
        assert online.refit(base, base.version, 1000, 100.0, None, *examples(40), 3
                            ).n_examples == 40
    finally:
        online._process_learner = saved


def test_a_regression_learner_refits_its_one_output_and_serving_applies_it() -> None:
    base = make_regression_model(hidden=(64,))
    rng = np.random.default_rng(7)

    def target(X: np.ndarray) -> np.ndarray:
        return 3 * X[:, 0] - X[:, 1] + 5

    def rmse(model: LoadedModel, X: np.ndarray) -> float:
        return float(np.sqrt(np.mean((model.outputs(X)[:, 0] - target(X)) ** 2)))

    learner = OutputLayerLearner(base, capacity=2000, half_life=500)
    X = rng.normal(size=(2000, len(FEATURES)))
    learner.add(X, target(X))
    update = learner.fit(base, seq=1)
    message = json.loads(json.dumps(update.to_message()))
    assert message["shape"] == [1, 64]  # one output: an UP of a regression is [1, hidden]
    head = apply_update(base, ModelUpdate.from_message(message))
    assert head.version == f"{base.version}+1" and head.task == "regression"
    X_test = rng.normal(size=(500, len(FEATURES)))
    assert rmse(head, X_test) < 0.25 * rmse(base, X_test), (rmse(base, X_test),
                                                             rmse(head, X_test))
    fit = update.extra["fit"]
    assert fit["rmse_after"] < fit["rmse_before"]
    # The updated model's value is the new output layer on the frozen hidden layers.
    H = hidden_activations(base, X_test)
    expected = H @ update.weight.T + update.bias
    assert np.allclose(head.outputs(X_test), expected, rtol=1e-5, atol=1e-4)
    assert head.predict(X_test[:2]) == [float(v) for v in head.outputs(X_test[:2])[:, 0]]
    with pytest.raises(ModelError, match="finite numbers"):
        learner.add(X[:2], np.array([1.0, np.nan]))


def test_the_speed_layer_updates_a_users_own_network_through_its_last_linear_layer() -> None:
    """A factory's network (models.zoo.residual_mlp): the learner refits its ``head`` on the
    activations that feed it, and the update serves with every other layer shared."""
    from models.zoo import residual_mlp

    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(1500, len(FEATURES)))
    y = (X[:, 0] - X[:, 2] > 0).astype(np.int64)
    preprocessor = fit_preprocessor(FEATURES, X)
    params = {"width": 16, "blocks": 1, "dropout": 0.0}
    module = residual_mlp(len(FEATURES), len(CLASSES), **params).eval()
    manifest = msgspec.structs.replace(Manifest.draft(
        name="default", features=FEATURES, classes=CLASSES,
        preprocessing=preprocessor.to_dict(),
        architecture={"type": "factory", "factory": "models.zoo:residual_mlp",
                      "n_features": len(FEATURES), "n_outputs": len(CLASSES), "params": params},
        metrics={"accuracy": 0.5, "log_loss": 0.69, "auc": 0.5},
        reference={"inputs": [[0.0] * 4], "outputs": [[0.5, 0.5]], "atol": 0.5}),
        version="20261201T000000Z-fac700")
    base = LoadedModel(manifest, module)
    assert base.output_layer()[0] == "head"

    learner = OutputLayerLearner(base, capacity=2000, half_life=1e9)
    learner.add(X, y)
    update = learner.fit(base, seq=1)
    assert update.weight.shape == (2, 16)
    fit = update.extra["fit"]
    assert fit["log_loss_after"] < fit["log_loss_before"]
    assert fit["accuracy_after"] > 0.8 > fit["accuracy_before"]

    served = apply_update(base, update)
    assert served.version == f"{base.version}+1"
    assert served.module.project is base.module.project
    assert served.module.blocks is base.module.blocks
    assert base.module.head is not served.module.head
    accuracy = float(np.mean(served.outputs(X).argmax(axis=1) == y))
    assert accuracy == pytest.approx(fit["accuracy_after"], abs=0.02)
    assert float(np.mean(base.outputs(X).argmax(axis=1) == y)) < 0.8

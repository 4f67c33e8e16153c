"""A regression model and a user's network, served end to end against the real broker and S3.

One deployment, one worker: a regression version is announced and serves numbers (stream,
``POST /predict``, lookups); labels that are not numbers are dead-lettered; numeric labels
turn into UP updates that serve and into the live RMSE of ``quality_by_version``; a version of
another task is refused; a version built by a model factory is refused while
``MODEL_FACTORIES`` does not list it, and served once a worker that lists it starts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from app.settings import Settings
from devstack.harness import (WorkerProcess, announce, consume_until, http, poll, produce,
                              publish_small_model, run)
from models.loaded import LoadedModel
from models.online import ModelUpdate, apply_update
from models.registry import ModelRef, Registry
from transport.topics import ensure_topics

FEATURES = ["a", "b", "c"]
FACTORY = "models.zoo:residual_mlp"


class Deployment:
    """The deployment's settings, its registry, the versions published and its worker."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.settings = Settings.from_env(env)
        self.bootstrap = self.settings.bootstrap_servers
        self.registry = Registry(self.settings.registry_uri, self.settings.storage_options)
        self.refs: dict[str, ModelRef] = {}
        self.worker: WorkerProcess | None = None

    def publish(self, label: str, **kwargs: Any) -> ModelRef:
        ref = publish_small_model(self.registry, self.settings.model_name, FEATURES,
                                  kwargs.pop("classes", []), **kwargs)
        self.refs[label] = ref
        return ref

    def announce(self, ref: ModelRef) -> None:
        run(announce(self.bootstrap, self.settings.updates_topic, ref.to_message()))

    def start(self, name: str, **env: str) -> WorkerProcess:
        self.worker = WorkerProcess({**self.env, **env,
                                     "STRATUM_DATA_DIR": str(self.tmp / name)},
                                    self.tmp / f"{name}.log").start()
        return self.worker

    @property
    def url(self) -> str:
        assert self.worker is not None
        return self.worker.url

    def models(self) -> dict[str, Any]:
        status, body, _ = http("GET", f"{self.url}/models/")
        assert status == 200, body
        return body

    def predictions(self, prefix: str, n: int) -> list[dict[str, Any]]:
        """The predictions of the ids ``<prefix>-*`` (each id's newest), once there are
        ``n``."""
        values = run(consume_until(
            self.bootstrap, self.settings.predictions_topic,
            lambda vs: len({v["id"] for v in vs if v["id"].startswith(prefix + "-")}) >= n))
        return list({v["id"]: v for v in values if v["id"].startswith(prefix + "-")}.values())


@pytest.fixture(scope="module")
def deployment(settings_env: Callable[..., dict[str, str]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = settings_env(SPEED_LAYER="1", SPEED_WINDOW_S="1", SPEED_MIN_EXAMPLES="40",
                       TOPIC_PARTITIONS="2", ARCHIVE="0")
    d = Deployment(env, tmp_path_factory.mktemp("regression"))
    run(ensure_topics(d.settings))
    d.announce(d.publish("base", task="regression"))
    try:
        assert d.start("w0").wait_ready() == {"model_version": d.refs["base"].version}
        yield d
    finally:
        if d.worker is not None:
            d.worker.stop()


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(FEATURES))).round(4)


def target(X: np.ndarray) -> np.ndarray:
    return 3 * X[:, 0] - X[:, 1] + 1


def events(prefix: str, X: np.ndarray, labelled: bool = False) -> list[bytes]:
    out = []
    for i, x in enumerate(X):
        event: dict[str, Any] = {"id": f"{prefix}-{i}", "features": x.tolist()}
        if labelled:
            event["label"] = round(float(target(x[None, :])[0]), 4)
        out.append(json.dumps(event).encode())
    return out


def same_values(got: list[Any], expected: list[float]) -> bool:
    """Each prediction is a number, the model's float32 value up to float32 rounding (a row
    scored in another batch may be summed in another order)."""
    return all(type(g) is float for g in got) and len(got) == len(expected) and np.allclose(
        np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64),
        rtol=1e-5, atol=1e-6)



def test_a_regression_predicts_numbers_on_the_stream_and_over_http(
        deployment: Deployment) -> None:
    d = deployment
    base = d.registry.load_ref(d.refs["base"])
    X = rows(40, seed=1)
    bad_labels: list[Any] = ["high", True, [1.5]]
    bad = [json.dumps({"id": f"bad-{k}", "features": [0, 0, 0], "label": label}).encode()
           for k, label in enumerate(bad_labels)]
    run(produce(d.bootstrap, d.settings.events_topic, events("num", X) + bad))
    predictions = sorted(d.predictions("num", 40), key=lambda p: int(p["id"].split("-")[1]))
    assert all(sorted(p) == ["id", "model_version", "predicted", "ts"] for p in predictions)
    assert {p["model_version"] for p in predictions} == {base.version}
    assert same_values([p["predicted"] for p in predictions], base.predict(X))
    # Labels that are not numbers: dead-lettered with the reason, never predicted.
    letters = run(consume_until(d.bootstrap, d.settings.dlq_topic, lambda vs: len(vs) >= 3))
    assert sorted(json.loads(m["raw"])["id"] for m in letters) == ["bad-0", "bad-1", "bad-2"]
    assert all(m["error"].startswith("'label' must be a number for a regression model")
               for m in letters)
    assert not any(p["id"].startswith("bad-") for p in d.predictions("num", 40))

    # POST /predict answers the same numbers, one object or a list (one row alone is a
    # batch of one: its sums may be taken in another order than in a batch of 40).
    status, body, _ = http("POST", f"{d.url}/predict",
                           [{"id": f"h{i}", "features": x.tolist()} for i, x in enumerate(X)])
    assert status == 200 and [p["id"] for p in body] == [f"h{i}" for i in range(40)]
    assert all("probabilities" not in p and p["model_version"] == base.version for p in body)
    assert same_values([p["predicted"] for p in body], [p["predicted"] for p in predictions])
    status, one, _ = http("POST", f"{d.url}/predict",
                          {"id": "one", "features": X[0].tolist(), "label": 2})
    assert status == 200 and same_values([one["predicted"]], [predictions[0]["predicted"]])
    status, refused, _ = http("POST", f"{d.url}/predict",
                              [{"id": "x", "features": [1, 2, 3], "label": "2"}])
    assert status == 400 and refused["errors"][0]["index"] == 0
    assert "must be a number for a regression model" in refused["errors"][0]["error"]
    # The latest prediction of an id, the model's description and the web view.
    status, latest, _ = http("GET", f"{d.url}/predictions/num-7/")
    assert status == 200 and latest["predicted"] == predictions[7]["predicted"]
    described = d.models()
    assert described["task"] == "regression" and described["classes"] == []
    status, page, _ = http("GET", f"{d.url}/plain")
    assert status == 200 and "(regression)" in page


def test_numeric_labels_become_updates_that_serve_and_a_live_rmse(
        deployment: Deployment) -> None:
    d = deployment
    base = d.registry.load_ref(d.refs["base"])
    labelled = 0

    def updates() -> dict[int, ModelUpdate]:
        """Every UP on the update topic by seq, each one checked as every worker checks it."""
        values = run(consume_until(d.bootstrap, d.settings.updates_topic, lambda vs: True))
        return {u.seq: u for u in (ModelUpdate.from_message(v) for v in values
                                   if v.get("type") == "UP")}

    for round_ in range(2):
        X = rows(120, seed=10 + round_)
        run(produce(d.bootstrap, d.settings.events_topic,
                    events(f"learn{round_}", X, labelled=True)))
        labelled += len(X)
        run(consume_until(d.bootstrap, d.settings.updates_topic,
                          lambda vs, k=round_: sum(v.get("type") == "UP" for v in vs) > k,
                          timeout=90))
    chain = updates()
    assert sorted(chain) == list(range(1, len(chain) + 1))
    for update in chain.values():
        assert update.base_version == base.version and update.weight.shape == (1, 8)
        assert update.extra["fit"]["rmse_after"] < update.extra["fit"]["rmse_before"]

    # Serving applies them: once the newest serves, predictions name <base>+<seq> and are
    # the values of the base with that update.
    newest = max(chain)
    poll(lambda: d.models()["active"],
         lambda v: v.startswith(f"{base.version}+") and int(v.split("+")[1]) >= newest)
    X = rows(30, seed=20)
    run(produce(d.bootstrap, d.settings.events_topic, events("after", X)))
    after = sorted(d.predictions("after", 30), key=lambda p: int(p["id"].split("-")[1]))
    chain = updates()
    for p, x in zip(after, X):
        version = p["model_version"]
        assert version.startswith(f"{base.version}+"), version
        updated = apply_update(base, chain[int(version.split("+")[1])])
        assert same_values([p["predicted"]], updated.predict(x[None, :]))

    # quality_by_version: each labelled event measured once, by the version that predicted
    # it, with a regression's figures.
    quality_rows = poll(
        lambda: http("GET", f"{d.url}/tables/quality_by_version/")[1]["rows"],
        lambda rs: sum(r["value"]["n"] for r in rs) >= labelled)
    quality = {r["key"]: r["value"] for r in quality_rows}
    assert sum(q["n"] for q in quality.values()) == labelled
    assert base.version in quality
    for q in quality.values():
        assert q["task"] == "regression" and "accuracy" not in q
        assert q["rmse"] >= q["mae"] >= 0 and math.isfinite(q["rolling_rmse"])
    # The untrained base is far off; the updates learnt the target from the labels.
    later = [q for k, q in quality.items() if k != base.version]
    assert later and min(q["rmse"] for q in later) < quality[base.version]["rmse"], quality
    # No count per predicted value: the class-count table has no rows for a regression.
    assert http("GET", f"{d.url}/tables/class_counts/")[1]["rows"] == []


def test_a_version_of_another_task_is_refused_and_the_regression_serves_on(
        deployment: Deployment) -> None:
    d = deployment
    serving = d.models()["active"]
    other = d.publish("classifier", classes=["low", "high"], seed=3)
    d.announce(other)
    state = poll(d.models, lambda s: other.version in s["refused"])
    assert state["refused"][other.version].startswith(
        "incompatible task: classification instead of regression")
    assert state["active"] == serving


def test_a_factory_network_is_refused_unless_listed_and_served_once_it_is(
        deployment: Deployment) -> None:
    d = deployment
    serving = d.models()["active"]
    factory = d.publish("factory", task="regression", factory=FACTORY,
                        params={"width": 8, "blocks": 1}, seed=4)
    d.announce(factory)
    state = poll(d.models, lambda s: factory.version in s["refused"])
    reason = state["refused"][factory.version]
    assert f"model factory '{FACTORY}' is not allowed here" in reason
    assert "MODEL_FACTORIES" in reason and state["active"] == serving
    assert state["last_refusal"]["version"] == factory.version
    run(produce(d.bootstrap, d.settings.events_topic, events("kept", rows(10, seed=30))))
    assert {p["model_version"] for p in d.predictions("kept", 10)} == {serving}

    # A worker that lists the factory serves that version: the newest announced one.
    assert d.worker is not None and d.worker.stop() == 0
    assert d.start("w1", MODEL_FACTORIES=f"{FACTORY}").wait_ready() == {
        "model_version": factory.version}
    model = Registry(d.settings.registry_uri, d.settings.storage_options,
                     factories=[FACTORY]).load_ref(factory)
    X = rows(20, seed=40)
    run(produce(d.bootstrap, d.settings.events_topic, events("factory", X)))
    served = sorted(d.predictions("factory", 20), key=lambda p: int(p["id"].split("-")[1]))
    assert {p["model_version"] for p in served} == {factory.version}
    assert same_values([p["predicted"] for p in served], model.predict(X))
    status, body, _ = http("POST", f"{d.url}/predict",
                           [{"id": f"f{i}", "features": x.tolist()} for i, x in enumerate(X)])
    assert status == 200 and same_values([p["predicted"] for p in body],
                                         [p["predicted"] for p in served])

    # Hot swap to another version of the user's network, with no restart, and the speed layer
    # updates it through its last linear layer: the served versions become <version>+<seq>.
    swapped = d.publish("factory-2", task="regression", factory=FACTORY,
                        params={"width": 8, "blocks": 1}, seed=5)
    d.announce(swapped)
    poll(lambda: d.models()["active"], lambda v: v == swapped.version)
    run(produce(d.bootstrap, d.settings.events_topic,
                events("teach", rows(200, seed=50), labelled=True)))
    values = run(consume_until(
        d.bootstrap, d.settings.updates_topic,
        lambda vs: any(v.get("type") == "UP" and v.get("base_version") == swapped.version
                       for v in vs), timeout=90))
    update = next(ModelUpdate.from_message(v) for v in values
                  if v.get("type") == "UP" and v.get("base_version") == swapped.version)
    assert update.weight.shape == (1, 8)
    assert update.extra["fit"]["rmse_after"] < update.extra["fit"]["rmse_before"]
    poll(lambda: d.models()["active"], lambda v: v.startswith(f"{swapped.version}+"))
    X = rows(10, seed=60)
    run(produce(d.bootstrap, d.settings.events_topic, events("updated", X)))
    base = Registry(d.settings.registry_uri, d.settings.storage_options,
                    factories=[FACTORY]).load_ref(swapped)
    for p in d.predictions("updated", 10):
        version = p["model_version"]
        assert version.startswith(f"{swapped.version}+"), version
        if version == update.version:
            x = X[int(p["id"].split("-")[1])]
            assert same_values([p["predicted"]], apply_update(base, update).predict(x[None, :]))

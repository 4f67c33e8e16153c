"""A rollout on the live stream, through Kafka with one worker: a shadow candidate predicts on
the shadow topic only, labelled events lead the policy to promote it, and it then serves; a
canary splits ids stably, and an operator aborts it with the admin token only; a canary whose
network fails on live events is aborted by the worker's health check, every event answered."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from app.settings import Settings
from devstack.harness import (WorkerProcess, announce, consume_until, http, poll, produce,
                              publish_small_model, run)
from models.registry import Registry
from transport.rollout import to_candidate
from transport.topics import ensure_topics

pytestmark = pytest.mark.integration

FEATURES = ["a", "b", "c"]
CLASSES = ["no", "yes"]
TOKEN = "rollout-test-token"
FAILING = "tests.factories:fails_on_large_inputs"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stream(settings_env: Any, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Settings, Registry, WorkerProcess]]:
    # The speed layer off: the serving version stays the same base throughout.
    env = settings_env(ADMIN_TOKEN=TOKEN, SPEED_LAYER="0", ARCHIVE="0", TOPIC_PARTITIONS="2",
                       ROLLOUT_MIN_EVENTS="100", ROLLOUT_MARGIN="0.01",
                       MODEL_FACTORIES=FAILING, PYTHONPATH=str(REPO))
    settings = Settings.from_env(env)
    registry = Registry(settings.registry_uri, settings.storage_options)
    run(ensure_topics(settings))
    tmp: Path = tmp_path_factory.mktemp("rollout")
    worker = WorkerProcess(env, tmp / "worker.log").start()
    try:
        yield settings, registry, worker
    finally:
        worker.stop()


def models(worker: WorkerProcess) -> dict[str, Any]:
    status, body, _ = http("GET", f"{worker.url}/models/")
    assert status == 200, body
    return body


def events(ids: list[str], X: np.ndarray, labels: list[str] | None) -> list[bytes]:
    out = []
    for i, (id_, x) in enumerate(zip(ids, X)):
        event: dict[str, Any] = {"id": id_, "features": x.round(4).tolist()}
        if labels is not None:
            event["label"] = labels[i]
        out.append(json.dumps(event).encode())
    return out


def of(prefix: str, n: int) -> Any:
    return lambda vs: sum(v["id"].startswith(prefix) for v in vs) >= n


def test_a_shadow_candidate_is_promoted_by_the_policy_and_an_operator_aborts_a_canary(
        stream: tuple[Settings, Registry, WorkerProcess]) -> None:
    settings, registry, worker = stream
    bootstrap = settings.bootstrap_servers
    v1, v2, v3 = (publish_small_model(registry, settings.model_name, FEATURES, CLASSES,
                                      seed=i) for i in range(3))
    run(announce(bootstrap, settings.updates_topic, v1.to_message()))
    assert worker.wait_ready() == {"model_version": v1.version}
    run(announce(bootstrap, settings.updates_topic,
                 {**v2.to_message(), "rollout": {"mode": "shadow"}}))
    rollout = poll(lambda: models(worker)["rollout"], lambda r: bool(r and r["loaded"]))
    assert (rollout["candidate"], rollout["mode"]) == (v2.version, "shadow")
    assert models(worker)["active"] == v1.version

    # The truth is what v2 predicts: the candidate is right every time, v1 about half.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    truth = registry.load_ref(v2).outputs(X).argmax(axis=1)
    labels = [CLASSES[k] for k in truth]
    ids = [f"s-{i}" for i in range(len(X))]
    run(produce(bootstrap, settings.events_topic, events(ids, X, labels)))
    served = [p for p in run(consume_until(bootstrap, settings.predictions_topic,
                                           of("s-", len(ids)))) if p["id"].startswith("s-")]
    shadow = [p for p in run(consume_until(bootstrap, settings.shadow_topic,
                                           of("s-", len(ids)))) if p["id"].startswith("s-")]
    assert {p["model_version"] for p in served} == {v1.version}
    assert {p["model_version"] for p in shadow} == {v2.version}
    assert sorted(p["id"] for p in shadow) == sorted(ids)
    assert all(p["predicted"] == label for p, label in
               zip(sorted(shadow, key=lambda p: int(p["id"][2:])), labels))

    # The policy promotes v2 on those labelled events, once, with its figures.
    decisions = [m for m in run(consume_until(
        bootstrap, settings.updates_topic,
        lambda vs: any(v.get("type") == "PROMOTE" for v in vs), timeout=90))
        if m.get("type") in ("PROMOTE", "ABORT")]
    assert len(decisions) == 1
    promote = decisions[0]
    assert (promote["version"], promote["by"]) == (v2.version, "policy")
    figures = promote["figures"]
    assert figures["test"] == "two-proportion-z" and figures["accuracy_candidate"] == 1.0
    assert figures["n_candidate"] >= 100 and figures["p_not_worse"] < 0.05
    state = poll(lambda: models(worker), lambda m: m["active"] == v2.version)
    assert state["rollout"]["candidate"] is None
    assert state["rollout"]["decision"]["type"] == "PROMOTE"
    run(produce(bootstrap, settings.events_topic, events(
        [f"after-{i}" for i in range(50)], X[:50], None)))
    after = run(consume_until(bootstrap, settings.predictions_topic, of("after-", 50)))
    assert {p["model_version"] for p in after if p["id"].startswith("after-")} == {v2.version}

    # A canary: a stable half of the ids is served by v3, the rest by v2.
    run(announce(bootstrap, settings.updates_topic,
                 {**v3.to_message(), "rollout": {"mode": "canary", "share": 0.5}}))
    poll(lambda: models(worker)["rollout"],
         lambda r: bool(r and r["candidate"] == v3.version and r["loaded"]))
    canary_ids = [f"c-{i}" for i in range(200)]
    run(produce(bootstrap, settings.events_topic, events(canary_ids, X[:200], None)))
    canary = [p for p in run(consume_until(bootstrap, settings.predictions_topic,
                                           of("c-", 200))) if p["id"].startswith("c-")]
    routed = dict(zip(canary_ids, to_candidate(canary_ids, 0.5).tolist()))
    assert len(canary) == 200
    assert all(p["model_version"] == (v3.version if routed[p["id"]] else v2.version)
               for p in canary)

    # An operator aborts it: refused without the token, done with it.
    status, body, _ = http("POST", f"{worker.url}/models/abort", {"reason": "no"})
    assert status == 401, body
    status, body, _ = http("POST", f"{worker.url}/models/abort", {"version": "v-other"},
                           token=TOKEN)
    assert status == 409, body
    status, body, _ = http("POST", f"{worker.url}/models/abort",
                           {"version": v3.version, "reason": "looks wrong"}, token=TOKEN)
    assert status == 200, body
    assert body["active"] == v2.version and body["rollout"]["candidate"] is None
    decision = body["rollout"]["decision"]
    assert (decision["type"], decision["version"], decision["by"], decision["reason"]) == (
        "ABORT", v3.version, "operator", "looks wrong")
    status, body, _ = http("POST", f"{worker.url}/models/promote", token=TOKEN)
    assert status == 409 and "no rollout" in body["error"], body
    # The aborted candidate serves no id any more.
    later = [f"d-{i}" for i in range(100)]
    run(produce(bootstrap, settings.events_topic, events(later, X[:100], None)))
    again = run(consume_until(bootstrap, settings.predictions_topic, of("d-", 100)))
    assert {p["model_version"] for p in again if p["id"].startswith("d-")} == {v2.version}


def test_a_canary_whose_network_fails_is_aborted_by_its_health_and_loses_no_event(
        stream: tuple[Settings, Registry, WorkerProcess]) -> None:
    settings, registry, worker = stream
    bootstrap = settings.bootstrap_servers
    serving = models(worker)["active"]
    # Its reference rows pass (the worker loads it); outlying live inputs make it raise.
    failing = publish_small_model(registry, settings.model_name, FEATURES, CLASSES, seed=4,
                                  factory=FAILING)
    run(announce(bootstrap, settings.updates_topic,
                 {**failing.to_message(), "rollout": {"mode": "canary", "share": 0.5}}))
    poll(lambda: models(worker)["rollout"],
         lambda r: bool(r and r["candidate"] == failing.version and r["loaded"]))

    ids = [f"h-{i}" for i in range(400)]
    X = np.random.default_rng(4).normal(size=(len(ids), 3)) * 100
    run(produce(bootstrap, settings.events_topic, events(ids, X, None)))
    answered = [p for p in run(consume_until(bootstrap, settings.predictions_topic,
                                             of("h-", len(ids)))) if p["id"].startswith("h-")]
    # Every event answered once, by the serving version, though half were the canary's.
    assert sorted(p["id"] for p in answered) == sorted(ids)
    assert {p["model_version"] for p in answered} == {serving}
    assert sum(to_candidate(ids, 0.5).tolist()) > 100

    aborts = [m for m in run(consume_until(
        bootstrap, settings.updates_topic,
        lambda vs: any(v.get("type") == "ABORT" and v.get("version") == failing.version
                       for v in vs), timeout=90))
        if m.get("type") == "ABORT" and m.get("version") == failing.version]
    assert len(aborts) == 1, aborts
    abort = aborts[0]
    assert abort["by"] == "policy"
    assert abort["reason"].startswith("error rate 1.000 > ROLLOUT_MAX_ERROR_RATE 0.01")
    assert abort["figures"]["failures"] == abort["figures"]["attempts"] >= 100
    state = poll(lambda: models(worker), lambda m: m["rollout"]["candidate"] is None)
    assert state["active"] == serving
    assert state["rollout"]["decision"]["type"] == "ABORT"

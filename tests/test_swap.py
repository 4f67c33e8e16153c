"""Model changes under the real broker and S3 server, with two workers in one group.

Every worker hears every announcement and swaps; broken announcements are refused with their
reason while the old version keeps serving; pin and rollback need the token, reach every
worker and survive a restart; speed-layer updates apply in order to their own base only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from app.settings import Settings
from devstack.stack import free_port
from transport.topics import ensure_topics
from models.registry import ModelRef, Registry
from models.storage import filesystem
from devstack.harness import (WorkerProcess, announce, consume_until, http, produce,
                           publish_small_model, run)

pytestmark = pytest.mark.integration

FEATURES = ["a", "b", "c"]
CLASSES = ["no", "yes"]
TOKEN = "swap-test-token"


class Cluster:
    """Two workers of one app (one consumer group) on different web ports."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.settings = Settings.from_env(env)
        self.bootstrap = self.settings.bootstrap_servers
        self.registry = Registry(self.settings.registry_uri, self.settings.storage_options)
        self.workers: list[WorkerProcess] = []
        self.versions: dict[str, ModelRef] = {}

    def start_worker(self, index: int, port: str | None = None) -> WorkerProcess:
        env = {**self.env, "STRATUM_DATA_DIR": str(self.tmp / f"w{index}-{time.time_ns()}")}
        if port is not None:
            env["WEB_PORT"] = port
        return WorkerProcess(env, self.tmp / f"worker-{index}.log").start()

    def publish(self, label: str, features: list[str] = FEATURES, seed: int = 0) -> ModelRef:
        ref = publish_small_model(self.registry, self.settings.model_name, features, CLASSES,
                                  seed=seed)
        self.versions[label] = ref
        return ref

    def announce(self, message: dict[str, Any]) -> None:
        run(announce(self.bootstrap, self.settings.updates_topic, message))

    def models(self, worker: WorkerProcess) -> dict[str, Any]:
        status, body, _ = http("GET", f"{worker.url}/models/")
        assert status == 200, body
        return body

    def wait_all(self, condition: Callable[[dict[str, Any]], bool], what: str,
                 timeout: float = 60.0) -> list[dict[str, Any]]:
        """Poll every worker's ``/models/`` until ``condition`` holds on each."""
        deadline = time.monotonic() + timeout
        while True:
            states = [self.models(w) for w in self.workers]
            if all(condition(s) for s in states):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"not every worker reached: {what}: {states}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(settings_env: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = settings_env(ADMIN_TOKEN=TOKEN, SPEED_LAYER="0")
    c = Cluster(env, tmp_path_factory.mktemp("swap"))
    run(ensure_topics(c.settings))
    c.announce(c.publish("v1").to_message())
    c.workers = [c.start_worker(0)]
    try:
        # The second worker joins a group the first already serves, as in a scale-out.
        assert c.workers[0].wait_ready() == {"model_version": c.versions["v1"].version}
        c.workers.append(c.start_worker(1, str(free_port())))
        for w in c.workers:
            assert w.wait_ready() == {"model_version": c.versions["v1"].version}
        yield c
    finally:
        for w in c.workers:
            w.stop()


def events(prefix: str, n: int) -> list[bytes]:
    rng = np.random.default_rng(len(prefix) + n)
    return [json.dumps({"id": f"{prefix}-{i}", "features": rng.normal(size=3).tolist()}).encode()
            for i in range(n)]


def predictions_for(c: Cluster, prefix: str, n: int) -> list[dict[str, Any]]:
    values = run(consume_until(c.bootstrap, c.settings.predictions_topic,
                               lambda vs: len({v["id"] for v in vs
                                               if v["id"].startswith(prefix + "-")}) >= n))
    return [v for v in values if v["id"].startswith(prefix + "-")]


def test_every_worker_swaps_and_answers_for_any_id(cluster: Cluster) -> None:
    c = cluster
    v2 = c.publish("v2", seed=1)
    c.announce(v2.to_message())
    states = c.wait_all(lambda s: s["active"] == v2.version, "v2 active")
    assert all(s["last_swap"]["version"] == v2.version for s in states)

    run(produce(c.bootstrap, c.settings.events_topic, events("swap", 200)))
    mine = predictions_for(c, "swap", 200)
    assert len({p["id"] for p in mine}) == 200
    assert {p["model_version"] for p in mine} == {v2.version}

    # The events are spread over both workers' partitions; either worker answers for any id.
    for i in range(0, 200, 25):
        for worker in c.workers:
            deadline = time.monotonic() + 30
            while (answer := http("GET", f"{worker.url}/predictions/swap-{i}/"))[0] != 200:
                assert time.monotonic() < deadline, answer
                time.sleep(0.1)
            assert answer[1]["id"] == f"swap-{i}"
            assert answer[1]["model_version"] == v2.version


def test_broken_announcements_are_refused_and_serving_goes_on(cluster: Cluster) -> None:
    c = cluster
    serving = c.versions["v2"].version
    bad_sum = c.publish("bad-sum", seed=2)
    missing = c.publish("missing-file", seed=3)
    fs, root = filesystem(c.settings.registry_uri, c.settings.storage_options)
    folder = f"{root}/{c.settings.model_name}/{missing.version}"
    weights = [f for f in fs.ls(folder) if not f.endswith("manifest.json")]
    assert weights
    fs.rm(weights[0])
    other_features = c.publish("other-features", features=["a", "b", "x"], seed=4)
    before = [c.models(w)["refusals"] for w in c.workers]

    c.announce({**bad_sum.to_message(), "sha256": "0" * 64})
    c.announce(missing.to_message())
    c.announce(other_features.to_message())
    c.announce({"type": "RETRAIN-NOW", "model": c.settings.model_name, "version": "x"})
    states = c.wait_all(lambda s: s["refusals"] >= min(before) + 4, "four refusals")

    for state in states:
        assert state["active"] == serving
        refused = state["refused"]
        assert "sha256" in refused[bad_sum.version]
        assert weights[0].rsplit("/", 1)[1] in refused[missing.version]
        assert "incompatible features" in refused[other_features.version]
        reasons = [r.get("reason", "") for r in state["history"]]
        assert any("unknown message type 'RETRAIN-NOW'" in r for r in reasons)
    # Serving never stopped: new events are answered by the version that was serving.
    run(produce(c.bootstrap, c.settings.events_topic, events("after-refusals", 50)))
    assert {p["model_version"] for p in predictions_for(c, "after-refusals", 50)} == {serving}
    _, metrics, _ = http("GET", f"{c.workers[0].url}/metrics")
    assert 'stratum_model_refusals_by_kind_total{kind="model"}' in metrics


def test_pin_needs_the_token_reaches_every_worker_and_survives_a_restart(
        cluster: Cluster) -> None:
    c = cluster
    v1, v2 = c.versions["v1"].version, c.versions["v2"].version
    url = f"{c.workers[0].url}/models/pin"
    status, body, _ = http("POST", url, {"version": v1})
    assert status == 401 and "token" in body["error"]
    assert http("POST", url, {"version": v1}, token="wrong")[0] == 401
    assert http("POST", url, {"nope": 1}, token=TOKEN)[0] == 400
    assert http("POST", url, raw=b"{", token=TOKEN)[0] == 400
    status, body, _ = http("POST", url, {"version": "no-such-version"}, token=TOKEN)
    assert status == 404 and "never announced" in body["error"]
    bad = c.versions["bad-sum"].version
    assert http("POST", url, {"version": bad}, token=TOKEN)[0] == 409

    status, body, _ = http("POST", url, {"version": v1}, token=TOKEN)
    assert status == 200 and body["pinned"] == v1 and body["active"] == v1
    c.wait_all(lambda s: s["active"] == v1 and s["pinned"] == v1, "pinned v1")

    # A newer announcement does not move a pinned worker.
    v3 = c.publish("v3", seed=5)
    c.announce(v3.to_message())
    c.wait_all(lambda s: v3.version in s["announced"], "v3 announced")
    assert all(c.models(w)["active"] == v1 for w in c.workers)

    # A restarted worker comes back on the pinned version.
    port = c.workers[1].env["WEB_PORT"]
    assert c.workers[1].stop() == 0
    c.workers[1] = c.start_worker(1, port)
    assert c.workers[1].wait_ready() == {"model_version": v1}
    assert c.models(c.workers[1])["pinned"] == v1

    # Lifting the pin goes to the newest version that verifies; rollback to the one before.
    status, body, _ = http("POST", url, {"version": None}, token=TOKEN)
    assert status == 200 and body["pinned"] is None and body["active"] == v3.version
    c.wait_all(lambda s: s["active"] == v3.version, "v3 after unpin")
    rollback = f"{c.workers[1].url}/models/rollback"
    assert http("POST", rollback)[0] == 401
    status, body, _ = http("POST", rollback, token=TOKEN)
    assert status == 200 and body["active"] == v2 and body["pinned"] == v2
    c.wait_all(lambda s: s["active"] == v2 and s["pinned"] == v2, "rolled back to v2")
    run(produce(c.bootstrap, c.settings.events_topic, events("rolled-back", 40)))
    assert {p["model_version"] for p in predictions_for(c, "rolled-back", 40)} == {v2}


def up(c: Cluster, base: str, seq: int, favour: int = 1) -> dict[str, Any]:
    """An UP message for ``base`` whose output layer always predicts class ``favour``."""
    from models.online import ModelUpdate

    bias = np.full(len(CLASSES), -20.0, dtype=np.float32)
    bias[favour] = 20.0
    return ModelUpdate(model=c.settings.model_name, base_version=base, seq=seq,
                       weight=np.zeros((len(CLASSES), 8), dtype=np.float32), bias=bias,
                       n_examples=64, created_at="2026-11-23T00:00:00Z").to_message()


def test_updates_apply_in_order_to_their_base_only(cluster: Cluster) -> None:
    c = cluster
    v1, v2, v3 = (c.versions[k].version for k in ("v1", "v2", "v3"))
    c.wait_all(lambda s: s["base_version"] == v2, "v2 serving (pinned by the rollback)")
    c.announce(up(c, v2, 2))
    c.wait_all(lambda s: s["active"] == f"{v2}+2" and s["update_seq"] == 2, "v2+2")
    dropped = [c.models(w)["updates_dropped"] for w in c.workers]

    c.announce(up(c, v2, 1, favour=0))  # stale: older than what serves
    c.announce(up(c, v1, 7, favour=0))  # another base: kept aside, not applied
    c.announce({**up(c, v2, 3, favour=0), "sha256": "0" * 64})  # tampered
    states = c.wait_all(lambda s: any("bad update" in r.get("reason", "")
                                      for r in s["history"]), "tampered update refused")
    for state, before in zip(states, dropped):
        assert state["active"] == f"{v2}+2" and state["updates_dropped"] == before + 1
    run(produce(c.bootstrap, c.settings.events_topic, events("updated", 60)))
    served = predictions_for(c, "updated", 60)
    assert {p["model_version"] for p in served} == {f"{v2}+2"}
    assert {p["predicted"] for p in served} == {"yes"}

    # A new base starts a new chain: v3 serves without v2's update.
    url = f"{c.workers[0].url}/models/pin"
    assert http("POST", url, {"version": None}, token=TOKEN)[0] == 200
    c.wait_all(lambda s: s["active"] == v3 and s["update_seq"] == 0, "v3 without updates")
    c.announce(up(c, v3, 1))
    c.wait_all(lambda s: s["active"] == f"{v3}+1", "v3+1")

"""The worker end to end against the real broker and S3 server.

Events in, predictions out; malformed events dead-lettered with their reason and source;
the web endpoints; serving tables recovered from their changelogs after a restart.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from app.settings import Settings
from transport.topics import ensure_topics
from models.registry import ModelRef, Registry
from devstack.harness import (WorkerProcess, announce, consume_until, http, produce,
                           publish_small_model, run)
from tests.test_schemas import MALFORMED

pytestmark = pytest.mark.integration

# The schema of tests/test_schemas.py, so that its malformed events fail here the same way.
FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]
N_VALID = 600


class Deployment:
    def __init__(self, env: dict[str, str], ref: ModelRef, worker: WorkerProcess,
                 tmp: Path) -> None:
        self.env, self.ref, self.worker, self.tmp = env, ref, worker, tmp
        self.settings = Settings.from_env(env)
        self.bootstrap = self.settings.bootstrap_servers


@pytest.fixture(scope="module")
def deployment(settings_env: Any, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    # Every prediction here must name the announced version: no speed-layer updates.
    env = settings_env(SPEED_LAYER="0")
    settings = Settings.from_env(env)
    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = publish_small_model(registry, settings.model_name, FEATURES, CLASSES)
    run(ensure_topics(settings))
    run(announce(settings.bootstrap_servers, settings.updates_topic, ref.to_message()))
    tmp = tmp_path_factory.mktemp("worker")
    worker = WorkerProcess(env, tmp / "worker.log").start()
    try:
        assert worker.wait_ready() == {"model_version": ref.version}
        yield Deployment(env, ref, worker, tmp)
    finally:
        worker.stop()


def valid_events(n: int, prefix: str) -> list[bytes]:
    out = []
    for i in range(n):
        values = [float(i % 7), -999.0 if i % 5 == 0 else i / 10, None if i % 11 == 0 else 1.5]
        features: Any = dict(zip(FEATURES, values)) if i % 2 else values
        event: dict[str, Any] = {"id": f"{prefix}-{i}", "features": features}
        if i % 3 == 0:
            event["label"] = CLASSES[i % 2]
        out.append(json.dumps(event).encode())
    return out


def test_every_valid_event_predicted_and_every_malformed_one_dead_lettered(
        deployment: Deployment) -> None:
    d = deployment
    s = d.settings
    malformed = [raw for raw, _ in MALFORMED]
    values: list[bytes | None] = valid_events(N_VALID, "e2e")
    # Interleave the malformed ones so they share micro-batches with valid events.
    for k, raw in enumerate(malformed):
        values.insert(k * 40, raw)
    positions = run(produce(d.bootstrap, s.events_topic, values))

    predictions = run(consume_until(
        d.bootstrap, s.predictions_topic,
        lambda vs: len({v["id"] for v in vs if v["id"].startswith("e2e-")}) >= N_VALID))
    mine = [p for p in predictions if p["id"].startswith("e2e-")]
    assert len(mine) == N_VALID and len({p["id"] for p in mine}) == N_VALID
    for p in mine:
        assert p["model_version"] == d.ref.version
        assert p["predicted"] in CLASSES and len(p["probabilities"]) == 2
        assert abs(sum(p["probabilities"]) - 1) < 1e-4 and isinstance(p["ts"], int)

    dead = run(consume_until(d.bootstrap, s.dlq_topic, lambda vs: len(vs) >= len(malformed)))
    assert len(dead) == len(malformed)
    expected_sources = {positions[values.index(raw)] for raw in malformed}
    assert {(m["source"]["partition"], m["source"]["offset"]) for m in dead} == expected_sources
    for m in dead:
        assert m["source"]["topic"] == s.events_topic and m["error"]
    reasons = " | ".join(m["error"] for m in dead)
    for _, reason in MALFORMED:
        assert reason in reasons
    # Still serving after all that.
    assert http("GET", f"{d.worker.url}/ready")[0] == 200


def test_web_endpoints(deployment: Deployment) -> None:
    d = deployment
    url = d.worker.url
    run(produce(d.bootstrap, d.settings.events_topic, valid_events(5, "web")))
    run(consume_until(d.bootstrap, d.settings.predictions_topic,
                      lambda vs: sum(v["id"].startswith("web-") for v in vs) >= 5))

    # The table row is written just after the prediction is sent: poll for it.
    deadline = time.monotonic() + 30
    while (answer := http("GET", f"{url}/predictions/web-3/"))[0] != 200:
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    status, body, _ = answer
    assert status == 200 and body["id"] == "web-3" and body["model_version"] == d.ref.version
    status, body, ctype = http("GET", f"{url}/predictions/never-seen/")
    assert status == 404 and "error" in body and ctype.startswith("application/json")

    status, body, _ = http("GET", f"{url}/tables/")
    assert {t["name"] for t in body["tables"]} >= {"latest_predictions", "class_counts",
                                                    "scored_by_version"}
    status, body, _ = http("GET", f"{url}/tables/latest_predictions/?limit=3")
    assert status == 200 and len(body["rows"]) == 3 and body["size"] >= 5
    assert http("GET", f"{url}/tables/nope/")[0] == 404
    status, body, _ = http("GET", f"{url}/tables/latest_predictions/?limit=lots")
    assert status == 400 and "limit" in body["error"]

    one = {"id": "p1", "features": {"a": 1, "b": 2, "c": 3}}
    status, body, _ = http("POST", f"{url}/predict", one)
    assert status == 200 and body["id"] == "p1" and body["model_version"] == d.ref.version
    status, body, _ = http("POST", f"{url}/predict", [one, {**one, "id": "p2"}])
    assert status == 200 and [b["id"] for b in body] == ["p1", "p2"]
    status, body, _ = http("POST", f"{url}/predict", [one, {"id": "bad", "features": [1]}])
    assert status == 400 and body["errors"][0]["index"] == 1
    status, body, _ = http("POST", f"{url}/predict", raw=b"{nope")
    assert status == 400 and "not JSON" in body["error"]
    status, body, _ = http("POST", f"{url}/predict", raw=b"[" * 100_000)  # too deep to parse
    assert status == 400 and "not JSON" in body["error"]
    status, body, _ = http("POST", f"{url}/predict", raw=b" " * (3 * 1024 * 1024))
    assert status == 413 and "body size" in body["error"]
    assert http("POST", f"{url}/predict", [])[0] == 400
    assert http("GET", f"{url}/predict")[0] == 405

    status, body, _ = http("GET", f"{url}/models/")
    assert body["active"] == d.ref.version and body["last_swap"]["version"] == d.ref.version
    # No ADMIN_TOKEN here: the admin endpoints do not exist.
    status, body, _ = http("POST", f"{url}/models/pin", {"version": d.ref.version}, token="x")
    assert status == 404 and "ADMIN_TOKEN" in body["error"]
    assert http("POST", f"{url}/models/rollback")[0] == 404
    status, text, ctype = http("GET", f"{url}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert f'stratum_events_scored_total{{model_version="{d.ref.version}"}}' in text
    status, page, ctype = http("GET", f"{url}/")
    assert status == 200 and ctype.startswith("text/html") and "/dashboard.json" in page
    status, body, _ = http("GET", f"{url}/dashboard.json")
    assert status == 200 and body["models"]["active"] == d.ref.version
    status, page, ctype = http("GET", f"{url}/plain")
    assert status == 200 and ctype.startswith("text/html")
    assert d.ref.version in page and "web-" in page


def test_batch_scoring_gives_the_numbers_the_worker_serves(deployment: Deployment, spark: Any
                                                           ) -> None:
    """``python -m batch score`` on a Parquet dataset: the version serving, the same
    preprocessing and the same rounded numbers as ``POST /predict`` on the same rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    from batch.errors import BatchError
    from batch.score import score_dataset
    from lake.errors import DataError

    d = deployment
    fs = s3fs.S3FileSystem(**d.settings.storage_options)
    root = d.settings.lake_uri.rsplit("/lake/", 1)[0]
    rng = np.random.default_rng(5)
    n = 300
    columns: dict[str, Any] = {"key": np.arange(n)}
    for j, name in enumerate(FEATURES):
        values = rng.normal(size=n) * (j + 1)
        values[rng.random(n) < 0.1] = -999.0
        columns[name] = pa.array(values, mask=rng.random(n) < 0.05)
    columns["note"] = ["x"] * n  # other columns are carried along unread
    table = pa.table(columns)
    for part, rows in enumerate((slice(0, 120), slice(120, n))):
        with fs.open(f"{root}/score-in/part-{part}.parquet", "wb") as out:
            pq.write_table(table.slice(rows.start, rows.stop - rows.start), out)

    out_uri = f"{root}/score-out/run-1"
    result = score_dataset(d.settings, f"{root}/score-in", out_uri, id_col="key", spark=spark)
    assert (result.version, result.rows, result.task) == (d.ref.version, n, "classification")
    assert fs.exists(f"{out_uri}/_SUCCESS")
    scored = pq.ParquetDataset(out_uri.removeprefix("s3://"), filesystem=fs).read().to_pylist()
    assert sorted(int(r["id"]) for r in scored) == list(range(n))
    by_id = {r["id"]: r for r in scored}

    sample = [int(i) for i in rng.choice(n, size=60, replace=False)]
    requests = []
    for i in sample:
        features = {}
        for name in FEATURES:
            value = table.column(name)[i].as_py()
            features[name] = value  # None (missing) travels as null
        requests.append({"id": str(i), "features": features})
    status, answers, _ = http("POST", f"{d.worker.url}/predict", requests)
    assert status == 200
    for answer in answers:
        row = by_id[answer["id"]]
        assert row["model_version"] == answer["model_version"] == d.ref.version
        assert row["predicted"] == answer["predicted"]
        assert row["probabilities"] == answer["probabilities"]

    # A named version scores the same; an occupied output and a missing feature are refused.
    again = score_dataset(d.settings, f"{root}/score-in", f"{root}/score-out/run-2",
                          version=d.ref.version, id_col="key", spark=spark)
    assert again.rows == n
    with pytest.raises(BatchError, match=r"holds \d+ files already"):
        score_dataset(d.settings, f"{root}/score-in", out_uri, id_col="key", spark=spark)
    with fs.open(f"{root}/score-bad/part-0.parquet", "wb") as out:
        pq.write_table(table.drop_columns(["b"]), out)
    with pytest.raises(DataError, match="lacks the column 'b'"):
        score_dataset(d.settings, f"{root}/score-bad", f"{root}/score-out/run-3",
                      id_col="key", spark=spark)


def test_tables_recovered_after_restart(deployment: Deployment) -> None:
    d = deployment
    run(produce(d.bootstrap, d.settings.events_topic, valid_events(20, "restart")))
    before = run(consume_until(d.bootstrap, d.settings.predictions_topic,
                               lambda vs: sum(v["id"].startswith("restart-") for v in vs) >= 20))
    expected = [p for p in before if p["id"] == "restart-7"][-1]
    # Tables are written just after predictions are sent; wait until they caught up with
    # every prediction on the topic.
    total = len(before)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = http("GET", f"{d.worker.url}/tables/scored_by_version/")[1]["rows"]
        if rows and rows[0]["value"] == total and http(
                "GET", f"{d.worker.url}/predictions/restart-7/")[0] == 200:
            break
        time.sleep(0.1)
    assert rows == [{"key": d.ref.version, "value": total}]
    assert d.worker.stop() == 0

    # A fresh local data directory: the state can only come back from the changelogs.
    env = {**d.env, "STRATUM_DATA_DIR": str(d.tmp / "after-restart")}
    d.worker = WorkerProcess(env, d.tmp / "worker-2.log").start()
    d.worker.wait_ready()
    status, body, _ = http("GET", f"{d.worker.url}/predictions/restart-7/")
    assert status == 200 and body == expected
    rows_after = http("GET", f"{d.worker.url}/tables/scored_by_version/")[1]["rows"]
    assert rows_after == [{"key": d.ref.version, "value": total}]

"""Hostile input against a real worker: every kind of malformed record on the input topic, and
a fuzz of every HTTP endpoint.

One worker (``faust -A app worker``, everything on: archive, speed layer, admin endpoints)
on the session's broker. Malformed records (devstack/corpus.py) mixed into a feed of valid
events each reach the dead-letter topic once, with a reason and the original bytes; every
valid event, unusual ones included, gets exactly one prediction with real probabilities; then
hundreds of hostile HTTP requests (devstack/http_fuzz.py) get no answer >= 500, and the worker
still serves.
"""
from __future__ import annotations

import base64
import json
import math
import random
from collections import Counter
from typing import Any, Callable, Iterator

import orjson
import pytest

from transport.schemas import dead_letter_message, decode_events
from app.settings import Settings
from devstack.corpus import HostileRecord, hostile_records
from devstack.http_fuzz import FuzzRequest, fuzz, make_requests, send
from devstack.harness import (WorkerProcess, consume_until, deploy_small_model, http,
                           produce_records, run)

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]
ADMIN_TOKEN = "hostile-admin-token"
N_VALID = 2000
FUZZ_REQUESTS = 300
FUZZ_SEED = 20261130


class Deployment:
    def __init__(self, env: dict[str, str], settings: Settings, worker: WorkerProcess) -> None:
        self.env, self.settings, self.worker = env, settings, worker
        self.bootstrap = settings.bootstrap_servers


@pytest.fixture(scope="module")
def deployment(settings_env: Callable[..., dict[str, str]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Everything on, so that hostile input reaches the archive and the speed layer too.
    env = settings_env(ADMIN_TOKEN=ADMIN_TOKEN, ARCHIVE="1", ARCHIVE_FLUSH_S="1",
                       SPEED_LAYER="1", SPEED_WINDOW_S="1", SPEED_MIN_EXAMPLES="50")
    settings, _ = deploy_small_model(env, FEATURES, CLASSES)
    worker = WorkerProcess(env, tmp_path_factory.mktemp("hostile") / "worker.log").start()
    try:
        worker.wait_ready()
        yield Deployment(env, settings, worker)
    finally:
        worker.stop()


def valid_event(event_id: str, i: int) -> bytes:
    features: Any = [float(i % 7), i / 10, None if i % 11 == 0 else 1.5]
    if i % 2:
        features = dict(zip(FEATURES, features))
    event: dict[str, Any] = {"id": event_id, "features": features}
    if i % 3 == 0:
        event["label"] = CLASSES[i % 2]
    return json.dumps(event).encode()


def original(dead_letter: dict[str, Any]) -> bytes:
    """The original bytes a dead letter quotes (their start, when it says it was cut)."""
    raw = dead_letter["raw"]
    return base64.b64decode(raw) if dead_letter.get("raw_encoding") == "base64" else \
        raw.encode("utf-8")


def test_the_corpus_holds_what_it_says_without_kafka() -> None:
    """Each malformed record is refused by the validation (in a micro-batch with the others,
    as serving decodes them), each edge record accepted under its id; every dead letter fits
    in a Kafka message."""
    corpus = hostile_records(FEATURES, CLASSES, "unit")
    columns = decode_events([r.value for r in corpus], FEATURES, CLASSES)
    refused = dict(columns.rejected)
    assert sorted(refused) == [i for i, r in enumerate(corpus) if r.malformed]
    assert columns.ids == [r.expect_id for r in corpus if not r.malformed]
    for i, reason in refused.items():
        letter = orjson.dumps(dead_letter_message(reason, corpus[i].value, "events", 0, i))
        assert len(letter) < 1_000_000, corpus[i].kind


def test_every_malformed_record_is_dead_lettered_and_every_valid_one_predicted_once(
        deployment: Deployment) -> None:
    d, s = deployment, deployment.settings
    corpus = hostile_records(FEATURES, CLASSES, "hostile")
    malformed = [r for r in corpus if r.malformed]
    assert len({r.kind for r in malformed}) >= 30
    # Valid events with a corpus record after every few, so that each shares its micro-batch
    # with valid events; the shuffle is fixed.
    feed: list[HostileRecord] = [HostileRecord("valid", f"v{i}".encode(),
                                               valid_event(f"hostile-valid-{i}", i),
                                               f"hostile-valid-{i}") for i in range(N_VALID)]
    step = N_VALID // len(corpus)
    for k, record in enumerate(random.Random(7).sample(corpus, len(corpus))):
        feed.insert(k * (step + 1) + step // 2, record)
    positions = produce_records(d.bootstrap, s.events_topic, [(r.key, r.value) for r in feed])
    expected_ids = Counter(r.expect_id for r in feed if not r.malformed)
    assert len(expected_ids) == len(feed) - len(malformed)  # ids are unique

    predictions = run(consume_until(
        d.bootstrap, s.predictions_topic,
        lambda vs: {v["id"] for v in vs} >= set(expected_ids), timeout=120))
    # Exactly one prediction per valid event, none for anything else.
    assert Counter(p["id"] for p in predictions) == expected_ids
    for p in predictions:
        probabilities = p["probabilities"]
        assert len(probabilities) == len(CLASSES) and all(
            isinstance(v, float) and math.isfinite(v) for v in probabilities), p
        assert abs(sum(probabilities) - 1) < 1e-4 and p["predicted"] in CLASSES

    where = {positions[i]: r for i, r in enumerate(feed) if r.malformed}
    dead = run(consume_until(
        d.bootstrap, s.dlq_topic,
        lambda vs: {(m["source"]["partition"], m["source"]["offset"]) for m in vs}
        >= set(where), timeout=120))
    assert len(dead) == len(malformed)
    for m in dead:
        record = where[(m["source"]["partition"], m["source"]["offset"])]
        assert m["source"]["topic"] == s.events_topic
        assert isinstance(m["error"], str) and m["error"].strip(), record.kind
        assert len(m["error"]) <= 2100, record.kind
        quoted, value = original(m), record.value or b""
        if m.get("raw_truncated"):
            assert m["raw_size"] == len(value) and value.startswith(quoted) and quoted, \
                record.kind
        else:
            assert quoted == value, record.kind
    # The near-megabyte ones did not fit whole: their dead letters say so.
    assert sum(bool(m.get("raw_truncated")) for m in dead) >= 5

    # Still serving: alive, ready, answering.
    assert d.worker.proc is not None and d.worker.proc.poll() is None
    assert http("GET", f"{d.worker.url}/ready")[0] == 200
    status, body, _ = http("POST", f"{d.worker.url}/predict",
                           {"id": "after", "features": [1, 2, 3]})
    assert status == 200 and body["id"] == "after"
    assert "Traceback" not in d.worker.log_path.read_text(errors="replace")


def test_an_http_fuzz_gets_no_server_error_and_the_worker_keeps_serving(
        deployment: Deployment) -> None:
    d = deployment
    known = [f"hostile-valid-{i}" for i in range(0, N_VALID, 97)]
    requests = make_requests(FUZZ_REQUESTS, FUZZ_SEED, d.worker.url.split("//")[1],
                             token=ADMIN_TOKEN, known_ids=known,
                             valid_event={"id": "fuzz", "features": [1.0, 2.0, 3.0]})
    report = run(fuzz(d.worker.url, requests, seed=FUZZ_SEED))
    summary = json.dumps(report.summary(), indent=1)
    assert report.server_errors == [], summary
    assert report.not_json_errors == [], summary
    assert report.unanswered == [], summary
    assert report.alive_after, summary
    # The fuzz reached the views: some requests were served, many refused.
    assert report.by_class["2xx"] >= 10 and report.by_class["4xx"] >= 100, summary

    # And the stream is still served.
    assert d.worker.proc is not None and d.worker.proc.poll() is None
    s = d.settings
    produce_records(d.bootstrap, s.events_topic,
                    [(None, valid_event(f"after-fuzz-{i}", i)) for i in range(20)])
    run(consume_until(d.bootstrap, s.predictions_topic,
                      lambda vs: {v["id"] for v in vs} >= {f"after-fuzz-{i}"
                                                           for i in range(20)}))


def raw_request(method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> FuzzRequest:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + \
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return FuzzRequest(target, method, target, head.encode("utf-8", "surrogateescape") + body)


@pytest.mark.parametrize("method, target, headers, body, status", [
    # int() refuses these, though str.isdigit() accepts them.
    ("GET", "/tables/latest_predictions/?limit=%C2%B2", {}, b"", 400),
    ("GET", "/tables/latest_predictions/?limit=" + "9" * 5000, {}, b"", 400),
    ("GET", "/tables/latest_predictions/?limit=0001", {}, b"", 200),
    # A bearer token that is not UTF-8.
    ("POST", "/models/pin", {"Authorization": "Bearer \udce9\udcff"}, b"{}", 401),
    ("HEAD", "/models/rollback", {"Authorization": "Bearer \udce9"}, b"", 401),
    # A body that is not what its Content-Encoding says.
    ("POST", "/predict", {"Content-Encoding": "gzip"}, b"not gzip", 400),
    # Nesting Python's json parsed but could not write back.
    ("POST", "/predict", {}, b'{"id": "x", "features": ' + b"[" * 967 + b"]" * 967 + b"}", 400),
    ("POST", "/predict", {}, b'{"id": "x", "features": [1, 2, 3], "label": '
     + b"[" * 1000 + b"]" * 1000 + b"}", 400),
    ("POST", "/models/pin", {"Authorization": f"Bearer {ADMIN_TOKEN}"},
     b'{"version": ' + b"[" * 967 + b"]" * 967 + b"}", 400),
    # Faust's /router/ pages (an unknown table answered 500): not served.
    ("GET", "/router/nope/", {}, b"", 404),
    ("GET", "/router/nope/key/", {}, b"", 404),
])
def test_requests_that_answered_500_get_a_json_refusal(
        deployment: Deployment, method: str, target: str, headers: dict[str, str],
        body: bytes, status: int) -> None:
    host, port = deployment.worker.url.split("//")[1].split(":")
    answer = run(send(host, int(port), raw_request(method, target, headers, body),
                      random.Random(0)))
    assert answer.status == status, answer
    if method != "HEAD":
        assert answer.content_type.startswith("application/json"), answer
        payload = json.loads(answer.body)
        assert "error" in payload if status >= 400 else "rows" in payload, payload

"""A rollout's automatic abort on the candidate's health: failures and latency, per worker."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import torch

from serving.health import CandidateHealth
from transport import protocol
from transport.protocol import Record, fold, replay
from transport.schemas import decode_events
from tests.test_online import CLASSES, FEATURES, make_model
from tests.test_protocol import MODEL, records, ref

NOW = 1_800_000_000_000


def test_the_error_rate_is_judged_after_the_minimum_count() -> None:
    health = CandidateHealth(max_error_rate=0.01, max_latency_ms=0, min_events=200)
    assert health.verdict() is None  # no rollout followed
    health.follow(("v2", 7))
    health.scored(150)
    health.scored(10, failed=True)
    assert health.verdict() is None  # 160 events: too few to judge
    health.scored(30)
    health.scored(2, failed=True)  # 12 of 192
    assert health.verdict() is None
    health.scored(220)  # 12 of 412: 0.029
    found = health.verdict()
    assert found is not None
    assert found.reason == "error rate 0.029 > ROLLOUT_MAX_ERROR_RATE 0.01 over 412 events"
    assert found.figures["failures"] == 12 and found.figures["attempts"] == 412
    # Under the limit: healthy.
    fine = CandidateHealth(max_error_rate=0.05, max_latency_ms=0, min_events=200)
    fine.follow(("v2", 7))
    fine.scored(400)
    fine.scored(12, failed=True)
    assert fine.verdict() is None


def test_the_p99_latency_of_the_candidates_answers_is_judged_and_0_is_no_limit() -> None:
    health = CandidateHealth(max_error_rate=0.01, max_latency_ms=5000, min_events=200)
    health.follow(("v2", 7))
    health.scored(300)
    health.answered(NOW, np.full(290, NOW - 100, dtype=np.int64))
    assert health.verdict() is None and health.p99_ms() == pytest.approx(100)
    health.answered(NOW, np.full(10, NOW - 7300, dtype=np.int64))
    found = health.verdict()
    assert found is not None and found.reason.startswith(
        "p99 latency 7300 ms > ROLLOUT_MAX_LATENCY_MS 5000")
    assert found.figures["p99_latency_ms"] == pytest.approx(7300)
    # Records without a timestamp are left out.
    health.answered(NOW, np.zeros(5, dtype=np.int64))
    assert health.latencies == 300
    unlimited = CandidateHealth(max_error_rate=0.01, max_latency_ms=0, min_events=200)
    unlimited.follow(("v2", 7))
    unlimited.scored(300)
    unlimited.answered(NOW, np.full(300, NOW - 60_000, dtype=np.int64))
    assert unlimited.verdict() is None


def test_everything_resets_when_the_candidate_changes_and_stays_bounded() -> None:
    health = CandidateHealth(max_error_rate=0.01, max_latency_ms=5000, min_events=10,
                             max_latencies=1000)
    health.follow(("v2", 7))
    health.scored(100, failed=True)
    for _ in range(30):
        health.answered(NOW, np.full(400, NOW - 10_000, dtype=np.int64))
    assert health.latencies <= 1000 and health.verdict() is not None
    health.answered(NOW, np.full(5000, NOW - 10_000, dtype=np.int64))  # one large batch
    assert health.latencies <= 1000
    health.follow(("v2", 7))  # the same rollout: nothing changes
    assert health.attempts == 100
    health.follow(("v2", 9))  # announced again: a new rollout
    assert (health.attempts, health.failures, health.latencies) == (0, 0, 0)
    assert health.verdict() is None
    health.follow(None)
    health.scored(100, failed=True)
    assert health.verdict() is None  # nothing to judge without a rollout


def test_two_workers_aborting_at_once_end_the_rollout_once() -> None:
    def abort(reason: str) -> str:
        return json.dumps(protocol.decision_message(
            protocol.ABORT, MODEL, "v2", "policy", reason, {"attempts": 412}, at=1))

    ledger = replay(records(ref("v1"), {**ref("v2"),
                                         "rollout": {"mode": "canary", "share": 0.2}}), MODEL)
    assert protocol.candidate(ledger) is not None
    once = fold(ledger, Record(2, abort("error rate 0.031 > ROLLOUT_MAX_ERROR_RATE 0.01")))
    twice = fold(once, Record(3, abort("p99 latency 7300 ms > ROLLOUT_MAX_LATENCY_MS 5000")))
    assert protocol.candidate(once) is None and protocol.should_serve(once) == "v1"
    assert protocol.should_serve(twice) == "v1" and twice.aborted == once.aborted
    assert [d.reason for d in twice.decisions] == [d.reason for d in once.decisions]


class Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: device-side assert triggered")


async def test_a_failing_canary_candidate_is_answered_by_the_serving_version_and_aborted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from serving import agent
    from serving.model_manager import Routing
    from serving.scoring import split_rows

    service = agent.serving
    health = CandidateHealth(max_error_rate=0.01, max_latency_ms=5000, min_events=50)
    monkeypatch.setattr(service, "health", health)
    serving_model = make_model(version="20261123T000000Z-aaaaaa")
    candidate = make_model(version="20261124T000000Z-bbbbbb", seed=1)
    candidate.module = Broken()
    sent: list[tuple[str, list[int], int]] = []

    def send(delivery: Any, batch: Any, model: Any, rows: list[int], outputs: np.ndarray,
             shadow: bool = False) -> int:
        sent.append((model.version, rows, len(outputs)))
        return NOW

    published: list[dict[str, Any]] = []

    async def publish(message: dict[str, Any], key: Any) -> None:
        published.append(message)

    monkeypatch.setattr(service, "_send_scored", send)
    monkeypatch.setattr(service, "_publish_abort", publish)
    from transport.lease import worker_lease

    # The lease is held (no stall): its clock does not tick in unit tests, and a long run of
    # other tests before this one must not make it doubtful.
    worker_lease.confirmed()
    loop = asyncio.get_running_loop()
    answered: set[int] = set()
    for b in range(3):
        ids = [f"user-{b}-{i}" for i in range(200)]
        values = [json.dumps({"id": i, "features": dict.fromkeys(FEATURES, 0.5)}).encode()
                  for i in ids]
        columns = decode_events(values, FEATURES, CLASSES)
        assert not columns.rejected
        rows = np.arange(len(columns), dtype=np.int64)
        batch = agent.MicroBatch(serving_model, 0.0, list(values), [0] * 200,
                                 list(range(200)), columns, rows, [], {0: 200},
                                 np.full(200, NOW - 50, dtype=np.int64))
        batch.routing = Routing(serving_model, candidate, "canary", 0.2, since=1)
        batch.served, batch.tried = split_rows(ids, "canary", 0.2)
        batch.scoring = loop.run_in_executor(None, serving_model.outputs,
                                             columns.features[batch.served])
        batch.candidate_scoring = loop.run_in_executor(None, candidate.outputs,
                                                       columns.features[batch.tried])
        sent.clear()
        await service._answer_rollout(None, batch, rows.tolist())  # type: ignore[arg-type]
        # Every event answered once, all by the serving version; none lost.
        assert {v for v, _, _ in sent} == {serving_model.version}
        answered_now = [r for _, rs, _ in sent for r in rs]
        assert sorted(answered_now) == list(range(200))
        answered.update(b * 1000 + r for r in answered_now)
        await asyncio.sleep(0)
    assert len(answered) == 600
    assert health.failures == health.attempts > 50
    # One ABORT, however many micro-batches failed after the limit was crossed.
    assert len(published) == 1
    message = published[0]
    assert (message["type"], message["version"], message["by"]) == (
        "ABORT", candidate.base_version, "policy")
    assert message["reason"].startswith("error rate 1.000 > ROLLOUT_MAX_ERROR_RATE 0.01")
    assert message["figures"]["failures"] == message["figures"]["attempts"]

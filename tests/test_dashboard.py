"""The dashboard's figures (serving.dashboard): ring buffers, rates, the group's aggregate."""
from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from serving.dashboard import (LATEST_ROWS, QUALITY_VERSIONS, SAMPLE_S, Sampler, aggregate,
                               rates)
from serving.latency import EventLatency, LatencyCollector, percentiles


def quality_row(version: str, n: int, acc: float) -> dict[str, Any]:
    return {"key": version, "value": {"task": "classification", "n": n,
                                      "rolling_accuracy": acc, "accuracy": acc}}


def share(url: str, scored: list[list[float]], **more: Any) -> dict[str, Any]:
    return {"url": url, "active": "v1", "task": "classification",
            "models": {"model": "m", "active": "v1", "update_seq": 0, "refusals": 0},
            "history": [], "scored": scored, "quality": [], "quality_now": [],
            "class_windows": [], "latest": [], **more}


def test_the_ring_buffers_are_bounded() -> None:
    sampler = Sampler(maxlen=5)
    rows = [quality_row(f"v{i}", i, 0.5) for i in range(QUALITY_VERSIONS + 4)]
    for i in range(12):
        sampler.sample(100.0 + 2 * i, 10.0 * i, rows)
    assert len(sampler.scored) == 5 and len(sampler.quality) == 5
    assert sampler.scored[0] == [114.0, 70.0] and sampler.scored[-1] == [122.0, 110.0]
    # Only the newest versions of a sample are kept (rows come newest first).
    assert list(sampler.quality[-1][1]) == [f"v{i}" for i in range(QUALITY_VERSIONS)]
    # No quality rows (a worker without the summaries): no quality sample.
    sampler.sample(200.0, 500.0, [])
    assert sampler.quality[-1][0] == 122.0


def test_rates_are_differences_of_counts_on_the_sampling_grid() -> None:
    samples = [[100.0, 0.0], [102.1, 42.0], [104.0, 80.0], [106.0, 5.0], [108.0, 25.0]]
    got = rates(samples)
    # 42 events over 2.1 s, 38 over 1.9 s; a count that went down (a restart) gives no rate.
    assert got == [(102.0, 20.0), (104.0, 20.0), (108.0, 10.0)]
    assert all(t % SAMPLE_S == 0 for t, _ in got)
    assert rates([]) == [] and rates([[1.0, 5.0]]) == []


def test_aggregate_puts_the_workers_together_and_lists_an_unreachable_one() -> None:
    a = share("http://a:1", [[100.0, 0.0], [102.0, 20.0], [104.0, 60.0]],
              history=[{"version": "v1", "at": 99.0, "kind": "swap"},
                       {"version": "v2", "at": 103.0, "kind": "refused model",
                        "reason": "bad"}],
              latest=[{"key": "x", "value": {"id": "x", "ts": 5000, "predicted": "b"}},
                      {"key": "y", "value": {"id": "y", "ts": 1000, "predicted": "s"}}])
    b = share("http://b:2", [[102.0, 100.0], [104.0, 110.0], [106.0, 130.0]],
              keeps_summaries=True,
              class_windows=[{"key": "b", "window_start": 60.0, "window_end": 119.9,
                              "value": 7},
                             {"key": "s", "window_start": 0.0, "window_end": 59.9,
                              "value": 3}],
              quality=[[102.0, {"v1": [10, 0.8]}], [104.0, {"v1": [12, 0.75],
                                                            "v2": [1, 1.0]}]],
              quality_now=[{"version": "v2", "n": 1, "task": "classification",
                            "figure": "rolling_accuracy", "value": 1.0}],
              latest=[{"key": "x", "value": {"id": "x", "ts": 6000, "predicted": "s"}},
                      {"key": "z", "value": {"id": "z", "ts": 3000, "predicted": "b"}}])
    # A stale replica of b's window on a, with a smaller count: not added twice.
    a["class_windows"] = [{"key": "b", "window_start": 60.0, "window_end": 119.9, "value": 5}]
    d = aggregate(a, [("http://b:2", b, None), ("http://c:3", None, "TimeoutError")], now=1.0)

    assert [(w["url"], w["reachable"], w["self"]) for w in d["workers"]] == [
        ("http://a:1", True, True), ("http://b:2", True, False), ("http://c:3", False, False)]
    assert d["workers"][2]["error"] == "TimeoutError"
    assert d["workers"][0]["predictions_per_s"] == 20.0 and d["workers"][0]["scored"] == 60.0
    assert d["workers"][1]["keeps_summaries"] and not d["workers"][0]["keeps_summaries"]

    rate = d["predictions_per_s"]
    assert rate["t"] == [102.0, 104.0, 106.0]
    assert rate["series"] == {"http://a:1": [10.0, 20.0, None], "http://b:2": [None, 5.0, 10.0]}
    assert rate["total"] == [10.0, 25.0, 10.0]

    mix = d["class_mix"]
    assert mix["t"] == [0.0, 60.0] and mix["window_s"] == 60.0
    assert mix["series"] == {"b": [0, 7], "s": [3, 0]}

    q = d["quality"]
    assert q["t"] == [102.0, 104.0] and q["series"] == {"v1": [0.8, 0.75], "v2": [None, 1.0]}
    assert q["figure"] == "rolling_accuracy" and q["now"][0]["version"] == "v2"

    assert [r["version"] for r in d["timeline"]] == ["v2", "v1"]  # newest first
    # The newest prediction of each id, wherever it is, newest first, with its worker.
    assert [(p["id"], p["predicted"], p["worker"]) for p in d["latest"]] == [
        ("x", "s", "http://b:2"), ("z", "b", "http://b:2"), ("y", "s", "http://a:1")]
    assert d["models"]["active"] == "v1"
    assert d["latency"] == {"t": [], "unit": "ms", "p50": {"http://a:1": [], "http://b:2": []},
                            "p99": {"http://a:1": [], "http://b:2": []}}


def test_aggregate_keeps_its_lists_bounded() -> None:
    many = [{"key": f"id{i}", "value": {"id": f"id{i}", "ts": i}} for i in range(300)]
    quality = [[100.0 + 2 * i, {f"v{i}": [1, 0.5]}] for i in range(40)]
    d = aggregate(share("http://a:1", [], latest=many, quality=quality,
                        history=[{"version": "v", "at": float(i), "kind": "update"}
                                 for i in range(200)]), [])
    assert len(d["latest"]) == LATEST_ROWS and d["latest"][0]["id"] == "id299"
    assert len(d["quality"]["series"]) == QUALITY_VERSIONS
    assert "v39" in d["quality"]["series"] and "v0" not in d["quality"]["series"]
    assert len(d["timeline"]) == 50
    assert d["predictions_per_s"] == {"t": [], "series": {"http://a:1": []}, "total": []}


def test_latency_percentiles_are_those_of_the_window() -> None:
    assert percentiles(np.empty(0)) is None
    assert percentiles(np.arange(1, 101, dtype=np.float64)) == (50.5, 99.01)
    latency = EventLatency()
    # Records at 10 000 ms: latencies 10..1000 ms; a record without a timestamp (-1) is left
    # out, and one ahead of this clock counts as 0.
    latency.record(10_000, np.array([9_990, 9_000, -1, 10_005], dtype=np.int64))
    latency.record(10_000, np.array([], dtype=np.int64))
    got = latency.take()
    assert sorted(got.tolist()) == [0.0, 10.0, 1000.0]
    assert latency.take().tolist() == [] and latency.recent == 0  # taken: the next window
    sampler = Sampler()
    sampler.sample(100.0, 0.0, [], np.array([], dtype=np.float64))  # nothing answered
    sampler.sample(102.0, 3.0, [], got)
    assert list(sampler.latency) == [[102.0, 10.0, 980.2, 3]]
    p50, p99 = sampler.latency[-1][1:3]
    assert 0 < p50 <= p99


def test_latency_stays_bounded_and_its_histogram_counts_every_event() -> None:
    latency = EventLatency(max_recent=100)
    for k in range(50):
        latency.record(1_000_000, np.full(7, 1_000_000 - 20 * (k + 1), dtype=np.int64))
    assert latency.recent <= 100
    window = latency.take()
    assert len(window) <= 100 and window.max() == 1000.0  # the newest batches are kept
    latency.record(1_000_000, np.full(500, 1_000_000 - 3, dtype=np.int64))  # one large batch
    assert latency.recent == 100
    assert int(latency.counts.sum()) == 50 * 7 + 100
    registry = CollectorRegistry()
    registry.register(LatencyCollector(latency))
    text = generate_latest(registry).decode()
    assert 'stratum_event_latency_seconds_bucket{le="0.005"} 100.0' in text
    assert 'stratum_event_latency_seconds_bucket{le="+Inf"} 450.0' in text
    assert "stratum_event_latency_seconds_count 450.0" in text
    line = next(x for x in text.splitlines() if x.startswith("stratum_event_latency_seconds_sum"))
    assert float(line.split()[1]) == sum(7 * 20 * (k + 1) for k in range(50)) / 1000 + 0.3


def test_aggregate_charts_each_workers_latency() -> None:
    a = share("http://a:1", [], latency=[[100.1, 5.0, 9.0, 10], [102.0, 6.0, 12.0, 4]])
    b = share("http://b:2", [], latency=[[102.0, 7.0, 8.0, 3], [104.0, 4.0, 4.5, 1]])
    d = aggregate(a, [("http://b:2", b, None)])
    assert d["latency"] == {"t": [100.0, 102.0, 104.0], "unit": "ms",
                            "p50": {"http://a:1": [5.0, 6.0, None],
                                    "http://b:2": [None, 7.0, 4.0]},
                            "p99": {"http://a:1": [9.0, 12.0, None],
                                    "http://b:2": [None, 8.0, 4.5]}}
    assert [(w["latency_p50_ms"], w["latency_p99_ms"]) for w in d["workers"]] == [
        (6.0, 12.0), (4.0, 4.5)]


def test_aggregate_shows_the_rollout_with_its_decisions_and_comparison() -> None:
    assert aggregate(share("http://a:1", []), [])["rollout"] is None
    promote = {"type": "PROMOTE", "model": "m", "version": "v0", "by": "policy",
               "reason": "better", "figures": {"candidate": 0.9, "serving": 0.8}, "at": 90_000}
    abort = {"type": "ABORT", "model": "m", "version": "vx", "by": "operator", "reason": "",
             "figures": {}, "at": 95_000}
    a = share("http://a:1", [],
              rollout={"candidate": "v2", "mode": "shadow", "share": 0.1, "since": 7,
                       "since_ms": 99_000, "loaded": True, "decision": abort},
              decisions=[promote, abort],
              quality=[[100.0, {"v1": [10, 0.8], "v2": [4, 0.75]}],
                       [102.0, {"v1": [12, 0.8], "v2": [8, 0.875]}]],
              quality_now=[{"version": "v2", "n": 8, "task": "classification",
                            "figure": "rolling_accuracy", "value": 0.875},
                           {"version": "v1", "n": 12, "task": "classification",
                            "figure": "rolling_accuracy", "value": 0.8}])
    r = aggregate(a, [])["rollout"]
    assert (r["candidate"], r["mode"], r["share"], r["since"], r["since_ms"], r["loaded"]) == (
        "v2", "shadow", 0.1, 7, 99_000, True)
    assert r["serving"] == "v1" and r["decision"] == abort
    assert r["decisions"] == [abort, promote]  # newest first
    c = r["comparison"]
    assert c["t"] == [100.0, 102.0] and c["series"] == {"v1": [0.8, 0.8], "v2": [0.75, 0.875]}
    assert c["verdict"] == {"figure": "rolling_accuracy", "candidate": 0.875, "serving": 0.8,
                            "candidate_n": 8, "serving_n": 12, "ahead": "candidate"}
    # A regression: the lower RMSE is ahead. A rollout that ended: no candidate, no verdict.
    for q in a["quality_now"]:
        q["figure"] = "rolling_rmse"
    assert aggregate(a, [])["rollout"]["comparison"]["verdict"]["ahead"] == "serving"
    a["rollout"] = {"candidate": None, "mode": None, "share": None, "since": None,
                    "since_ms": None, "loaded": False, "decision": promote}
    r = aggregate(a, [])["rollout"]
    assert r["candidate"] is None and r["comparison"]["verdict"]["ahead"] is None
    assert list(r["comparison"]["series"]) == ["v1"]

"""The figures behind the dashboard (``GET /`` reads ``GET /dashboard.json``).

Every worker samples its own figures every :data:`SAMPLE_S` seconds into ring buffers of
:data:`SERIES_LEN` samples (10 minutes): the events it scored so far (predictions/s are the
differences) and, on the worker that keeps ``quality_by_version``, the rolling quality of the
newest :data:`QUALITY_VERSIONS` versions, and the p50 and p99 event-to-prediction latency of
the events it answered since the previous sample (:mod:`serving.latency`: from the input
record's Kafka timestamp to the prediction handed to the producer). :func:`local_snapshot` is
one worker's share;
:func:`aggregate` puts the shares of every worker of the group together, a worker that did not
answer listed as unreachable. Memory is bounded: the buffers have a maximum length and every
list in a snapshot is cut.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from app import app
from serving.latency import percentiles
from serving.metrics import EVENT_LATENCY, keeps_summaries, scored_total
from serving.model_manager import model_manager
from serving.tables import table_rows

settings = app.settings

__all__ = ["SAMPLE_S", "SERIES_LEN", "QUALITY_VERSIONS", "LATEST_ROWS", "MAX_WINDOWS",
           "Sampler", "sampler", "local_snapshot", "aggregate", "quality_figure", "rates"]

#: Seconds between two samples.
SAMPLE_S = 2.0
#: Samples kept per series: 10 minutes at :data:`SAMPLE_S`.
SERIES_LEN = 300
#: Newest versions whose quality is sampled (the speed layer makes one every few seconds).
QUALITY_VERSIONS = 8
#: Latest predictions shown, across the group.
LATEST_ROWS = 20
#: ``class_counts`` windows shown (60-second windows: the last hour).
MAX_WINDOWS = 60
#: Entries of the swap and refusal timeline shown (``GET /models/`` keeps 50).
MAX_TIMELINE = 50

#: Decisions (``PROMOTE``, ``ABORT``) shown (the ledger keeps 10).
MAX_DECISIONS = 10

#: The field of a ``quality_by_version`` row each task's chart shows.
QUALITY_FIELD = {"classification": "rolling_accuracy", "regression": "rolling_rmse"}


def quality_figure(row: Mapping[str, Any]) -> tuple[str, float | None]:
    """The figure a quality row is charted by: (field name, value)."""
    name = QUALITY_FIELD.get(str(row.get("task", "classification")), "rolling_accuracy")
    value = row.get(name)
    return name, float(value) if isinstance(value, (int, float)) else None


class Sampler:
    """One worker's ring buffers of samples."""

    def __init__(self, maxlen: int = SERIES_LEN) -> None:
        #: ``[t (epoch s), events scored so far]``
        self.scored: deque[list[float]] = deque(maxlen=maxlen)
        #: ``[t, {version: [labelled events, figure]}]``
        self.quality: deque[list[Any]] = deque(maxlen=maxlen)
        #: ``[t, p50 ms, p99 ms, events]`` of the latencies since the previous sample
        self.latency: deque[list[float]] = deque(maxlen=maxlen)

    def sample(self, now: float, scored: float,
               quality_rows: Sequence[Mapping[str, Any]],
               latencies_ms: np.ndarray | None = None) -> None:
        """Record one sample: the scored count, the newest quality rows (if any) and the
        percentiles of the latencies since the previous sample (if any)."""
        self.scored.append([round(now, 3), scored])
        if latencies_ms is not None and len(latencies_ms):
            p50, p99 = percentiles(latencies_ms) or (0.0, 0.0)
            self.latency.append([round(now, 3), p50, p99, len(latencies_ms)])
        if quality_rows:
            figures: dict[str, list[Any]] = {}
            for row in quality_rows[:QUALITY_VERSIONS]:
                value = row.get("value") or {}
                figures[str(row["key"])] = [value.get("n", 0), quality_figure(value)[1]]
            self.quality.append([round(now, 3), figures])


sampler = Sampler()


async def sample_dashboard() -> None:
    """Sample this worker's figures (a timer on every worker)."""
    quality = (table_rows("quality_by_version", QUALITY_VERSIONS)["rows"]
               if "quality_by_version" in app.tables else [])
    sampler.sample(time.time(), scored_total(), quality, EVENT_LATENCY.take())


app.timer(interval=SAMPLE_S, name="dashboard_sample")(sample_dashboard)


def local_snapshot(url: str | None = None) -> dict[str, Any]:
    """This worker's share of the dashboard (also what a peer answers)."""
    described = model_manager.describe()
    windows = table_rows("class_counts", MAX_WINDOWS * 20)["rows"]
    quality_rows = table_rows("quality_by_version", QUALITY_VERSIONS)["rows"] \
        if "quality_by_version" in app.tables else []
    return {
        "url": url or settings.advertised_url,
        "ts": time.time(),
        "active": described["active"],
        "keeps_summaries": keeps_summaries(),
        "task": described["task"],
        "models": {k: described[k] for k in (
            "model", "active", "base_version", "update_seq", "pinned", "task", "classes",
            "refusals", "updates_applied", "updates_dropped", "last_swap", "last_refusal")},
        "history": described["history"][-MAX_TIMELINE:],
        "rollout": described.get("rollout"),
        "decisions": [d.to_message() for d in
                      model_manager.ledger.topic.decisions[-MAX_DECISIONS:]],
        "scored": list(sampler.scored),
        "quality": list(sampler.quality),
        "latency": list(sampler.latency),
        "quality_now": [{"version": r["key"], "n": r["value"].get("n"),
                         "task": r["value"].get("task", "classification"),
                         "figure": quality_figure(r["value"])[0],
                         "value": quality_figure(r["value"])[1]} for r in quality_rows],
        "class_windows": windows,
        "latest": table_rows("latest_predictions", LATEST_ROWS)["rows"],
    }


def _bucket(t: float) -> float:
    """``t`` on the sampling grid, so that the samples of different workers line up."""
    return round(round(t / SAMPLE_S) * SAMPLE_S, 3)


def rates(samples: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Events per second between consecutive ``[t, count]`` samples, at the later one's
    time (a count that went down, a restart, gives no rate)."""
    out: list[tuple[float, float]] = []
    previous: Sequence[float] | None = None
    for sample in samples:
        if previous is not None:
            dt = sample[0] - previous[0]
            dn = sample[1] - previous[1]
            if dt > 0 and dn >= 0:
                out.append((_bucket(sample[0]), round(dn / dt, 3)))
        previous = sample
    return out


def _aligned(series: Mapping[str, Iterable[tuple[float, float | None]]]
             ) -> dict[str, Any]:
    """Series of (t, value) as one time axis and a list of values per name (None where a
    series has no value at that time): the shape uPlot plots."""
    by_name = {name: dict(points) for name, points in series.items()}
    t = sorted({x for points in by_name.values() for x in points})
    return {"t": t, "series": {name: [points.get(x) for x in t]
                               for name, points in by_name.items()}}


def rollout_view(mine: Mapping[str, Any],
                 quality_points: Mapping[str, Sequence[tuple[float, float | None]]],
                 quality_now: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The rollout of ``GET /models/`` on the asked worker (None when there never was one),
    with the recent decisions (newest first) and the candidate's quality against the serving
    version's: their figure over time and the latest of each (``verdict``: which is ahead)."""
    described = mine.get("rollout")
    if not described:
        return None
    out: dict[str, Any] = dict(described)
    out["decisions"] = sorted(mine.get("decisions") or [], key=lambda d: d.get("at") or 0,
                              reverse=True)[:MAX_DECISIONS]
    candidate, serving = described.get("candidate"), mine.get("active")
    versions = [v for v in (serving, candidate) if v is not None]
    compared = _aligned({v: quality_points.get(v, []) for v in versions})
    now = {str(q["version"]): q for q in quality_now if q["version"] in versions}
    figure = next((str(q["figure"]) for q in now.values()), None)
    verdict: dict[str, Any] = {"figure": figure, "candidate": None, "serving": None,
                               "candidate_n": None, "serving_n": None, "ahead": None}
    if candidate in now:
        verdict["candidate"], verdict["candidate_n"] = now[candidate]["value"], now[candidate]["n"]
    if serving in now:
        verdict["serving"], verdict["serving_n"] = now[serving]["value"], now[serving]["n"]
    c, v = verdict["candidate"], verdict["serving"]
    if candidate is not None and c is not None and v is not None:
        better = (c < v) if figure == "rolling_rmse" else (c > v)
        verdict["ahead"] = "even" if c == v else ("candidate" if better else "serving")
    out["serving"] = serving
    out["comparison"] = {**compared, "verdict": verdict}
    return out


def aggregate(mine: Mapping[str, Any],
              peers: Sequence[tuple[str, Mapping[str, Any] | None, str | None]],
              now: float | None = None) -> dict[str, Any]:
    """The body of ``GET /dashboard.json``: this worker's snapshot and its peers' (``(url,
    snapshot or None, why not)``) as one view of the group."""
    shares = [mine] + [snap for _, snap, _ in peers if snap is not None]
    workers: list[dict[str, Any]] = []
    rate_series: dict[str, list[tuple[float, float]]] = {}
    p50_series: dict[str, list[tuple[float, float | None]]] = {}
    p99_series: dict[str, list[tuple[float, float | None]]] = {}
    for share in shares:
        worker_rates = rates(share.get("scored", []))
        rate_series[share["url"]] = worker_rates
        scored = share.get("scored") or []
        latency = share.get("latency") or []
        p50_series[share["url"]] = [(_bucket(x[0]), x[1]) for x in latency]
        p99_series[share["url"]] = [(_bucket(x[0]), x[2]) for x in latency]
        workers.append({
            "url": share["url"], "reachable": True, "self": share is mine,
            "active": share.get("active"),
            "update_seq": (share.get("models") or {}).get("update_seq"),
            "refusals": (share.get("models") or {}).get("refusals"),
            "predictions_per_s": worker_rates[-1][1] if worker_rates else None,
            "scored": scored[-1][1] if scored else None,
            "keeps_summaries": bool(share.get("keeps_summaries")),
            "latency_p50_ms": latency[-1][1] if latency else None,
            "latency_p99_ms": latency[-1][2] if latency else None,
        })
    for url, snap, why in peers:
        if snap is None:
            workers.append({"url": url, "reachable": False, "self": False, "error": why})

    rate = _aligned(rate_series)
    totals: list[float | None] = []
    for i in range(len(rate["t"])):
        values = [v[i] for v in rate["series"].values() if v[i] is not None]
        totals.append(round(sum(values), 3) if values else None)
    rate["total"] = totals

    # Latency: each worker's p50 and p99 on one time axis (the group's percentiles cannot be
    # made of the workers' ones; the chart shows every worker's).
    p50, p99 = _aligned(p50_series), _aligned(p99_series)  # the same times, per worker
    latency_view = {"t": p50["t"], "unit": "ms", "p50": p50["series"], "p99": p99["series"]}

    # class_counts has one partition: one worker counts; take the largest count seen for a
    # (window, class), so that a replica of the same rows elsewhere is not counted twice.
    counts: dict[tuple[float, str], int] = {}
    for share in shares:
        for row in share.get("class_windows", []):
            key = (float(row["window_start"]), str(row["key"]))
            counts[key] = max(counts.get(key, 0), int(row["value"]))
    starts = sorted({start for start, _ in counts})[-MAX_WINDOWS:]
    classes = sorted({cls for _, cls in counts})
    class_mix = {"t": starts, "window_s": None,
                 "series": {cls: [counts.get((s, cls), 0) for s in starts] for cls in classes}}
    windows = [row for share in shares for row in share.get("class_windows", [])]
    if windows:
        # Faust's windows end 0.1 s before the next one starts.
        class_mix["window_s"] = round(windows[0]["window_end"] - windows[0]["window_start"])

    # Quality: the newest versions, their figure over time.
    quality_points: dict[str, list[tuple[float, float | None]]] = {}
    last_seen: dict[str, float] = {}
    for share in shares:
        for t, figures in share.get("quality", []):
            for version, (_, value) in figures.items():
                quality_points.setdefault(version, []).append((_bucket(t), value))
                last_seen[version] = max(last_seen.get(version, 0.0), t)
    newest = sorted(last_seen, key=lambda v: last_seen[v])[-QUALITY_VERSIONS:]
    quality = _aligned({v: quality_points[v] for v in newest})
    quality_now = [q for share in shares for q in share.get("quality_now", [])]
    quality["now"] = quality_now
    quality["figure"] = quality_now[0]["figure"] if quality_now else (
        QUALITY_FIELD.get(str(mine.get("task")), "rolling_accuracy"))

    rollout = rollout_view(mine, quality_points, quality_now)

    latest: dict[str, dict[str, Any]] = {}
    for share in shares:
        for row in share.get("latest", []):
            value = row.get("value") or {}
            old = latest.get(row["key"])
            if old is None or value.get("ts", 0) > old.get("ts", 0):
                latest[row["key"]] = {**value, "id": row["key"], "worker": share["url"]}
    newest_predictions = sorted(latest.values(), key=lambda p: p.get("ts", 0),
                                reverse=True)[:LATEST_ROWS]

    timeline = sorted(mine.get("history", []), key=lambda r: r.get("at", 0),
                      reverse=True)[:MAX_TIMELINE]
    return {
        "generated_at": now if now is not None else time.time(),
        "worker": mine["url"],
        "sample_s": SAMPLE_S,
        "models": mine.get("models"),
        "workers": workers,
        "predictions_per_s": rate,
        "latency": latency_view,
        "class_mix": class_mix,
        "quality": quality,
        "rollout": rollout,
        "timeline": timeline,
        "latest": newest_predictions,
    }

"""Runtime metrics: Prometheus text on ``GET /metrics`` and a periodic JSON broadcast.

The counters are per worker process; Prometheus (or the ``metrics`` topic consumer) adds
them up across workers.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app import app
from lake.ledger import Flush
from serving.latency import EventLatency, LatencyCollector
from transport.topics import scored_topic_name, topic_spec

settings = app.settings

__all__ = ["REGISTRY", "EVENTS_SCORED", "EVENTS_DEAD_LETTERED", "BATCH_SECONDS",
           "BATCH_SIZE", "MODEL_REFUSALS", "SPEED_LEARNER", "MODEL_REFUSAL_REASONS", "snapshot",
           "prometheus_text", "count_scored", "scored_total", "keeps_summaries", "METRIC_MAX_VERSIONS", "record_model_state", "count_flush",
           "EVENT_LATENCY"]

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
EVENTS_SCORED = Counter("stratum_events_scored", "Valid events scored and sent as predictions",
                        ["model_version"], registry=REGISTRY)
EVENTS_DEAD_LETTERED = Counter("stratum_events_dead_lettered",
                               "Input messages sent to the dead-letter topic",
                               registry=REGISTRY)
BATCH_SECONDS = Histogram("stratum_batch_seconds",
                          "Time from taking a micro-batch to the broker storing all it produced",
                          buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                          registry=REGISTRY)
BATCH_SIZE = Histogram("stratum_batch_size", "Events per serving micro-batch",
                       buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 4096), registry=REGISTRY)
MODEL_REFUSALS = Gauge("stratum_model_refusals", "Model versions refused by this worker",
                       registry=REGISTRY)
MODEL_REFUSAL_REASONS = Counter("stratum_model_refusals_by_kind",
                                "Refused update-topic messages by kind (model, update, pin, "
                                "ignored)", ["kind"], registry=REGISTRY)
ACTIVE_MODEL = Gauge("stratum_active_model_info", "The version serving now (value is 1)",
                     ["model", "version"], registry=REGISTRY)
ARCHIVED_ROWS = Counter("stratum_archived_rows", "Events written to the lake",
                        registry=REGISTRY)
ARCHIVE_FILES = Counter("stratum_archive_files", "Parquet files written to the lake",
                        registry=REGISTRY)
#: Event-to-prediction latency (``stratum_event_latency_seconds``; the dashboard's p50/p99).
EVENT_LATENCY = EventLatency()
REGISTRY.register(LatencyCollector(EVENT_LATENCY))
SPEED_LEARNER = Gauge("stratum_speed_learner",
                      "1 on the worker that holds the scored-summary partition: it counts what "
                      "serving scored and runs the speed layer's learner; 0 elsewhere",
                      registry=REGISTRY)

#: Most model versions ``stratum_events_scored`` keeps a series for (the most recently scored):
#: the speed layer makes a new version every few seconds, and every series costs memory here
#: and in Prometheus.
METRIC_MAX_VERSIONS = 20
_scored_versions: OrderedDict[str, None] = OrderedDict()
#: Events scored by this worker since it started, every version (the series above drop old
#: versions, and their counts with them).
_scored_total = 0


def count_flush(flush: Flush) -> None:
    """Count a range the archive wrote to the lake (its ``on_flush`` callback)."""
    ARCHIVED_ROWS.inc(flush.rows)
    ARCHIVE_FILES.inc(len(flush.files))


def count_scored(version: str, n: int) -> None:
    """Count ``n`` events scored by ``version``, keeping series for the newest versions."""
    global _scored_total
    _scored_total += n
    EVENTS_SCORED.labels(version).inc(n)
    _scored_versions[version] = None
    _scored_versions.move_to_end(version)
    while len(_scored_versions) > METRIC_MAX_VERSIONS:
        old, _ = _scored_versions.popitem(last=False)
        EVENTS_SCORED.remove(old)


_SCORED_TOPIC = scored_topic_name(settings)
_WORKER = f"{socket.gethostname()}:{os.getpid()}:{settings.web_port}"
_STARTED = time.time()


_model_state: dict[str, Any] = {"active": None, "refusals": 0}


def scored_total() -> int:
    """Events scored by this worker since it started, whatever version scored them."""
    return _scored_total


def record_model_state(active_version: str | None, refusals: int) -> None:
    """The model manager's report whenever the serving version or its refusal count changes."""
    _model_state.update(active=active_version, refusals=refusals)
    MODEL_REFUSALS.set(refusals)
    ACTIVE_MODEL.clear()
    if active_version is not None:
        ACTIVE_MODEL.labels(settings.model_name, active_version).set(1)


def keeps_summaries() -> bool:
    """Whether this worker holds the scored-summary partition: it keeps ``class_counts``,
    ``scored_by_version`` and ``quality_by_version`` and runs the speed layer's learner."""
    return any(tp.topic == _SCORED_TOPIC for tp in app.assignor.assigned_actives())


def prometheus_text() -> bytes:
    """The metrics in Prometheus exposition format."""
    SPEED_LEARNER.set(int(keeps_summaries()))
    return generate_latest(REGISTRY)


def snapshot() -> dict[str, Any]:
    """The JSON broadcast on the metrics topic."""
    scored = {sample.labels["model_version"]: sample.value
              for metric in EVENTS_SCORED.collect() for sample in metric.samples
              if sample.name.endswith("_total")}
    batches = next(s.value for m in BATCH_SECONDS.collect() for s in m.samples
                   if s.name.endswith("_count"))
    seconds = next(s.value for m in BATCH_SECONDS.collect() for s in m.samples
                   if s.name.endswith("_sum"))
    return {
        "worker": _WORKER,
        "ts": int(time.time() * 1000),
        "uptime_s": round(time.time() - _STARTED, 1),
        "active_model": _model_state["active"],
        "events_scored": scored,
        "events_dead_lettered": sum(s.value for m in EVENTS_DEAD_LETTERED.collect()
                                    for s in m.samples if s.name.endswith("_total")),
        "batches": batches,
        "mean_batch_ms": round(1000 * seconds / batches, 3) if batches else None,
        "model_refusals": _model_state["refusals"],
    }


_METRICS = topic_spec(settings, settings.metrics_topic)
metrics_topic = app.topic(_METRICS.name, value_serializer="json", partitions=_METRICS.partitions)


async def broadcast_metrics() -> None:
    """Send this worker's metrics snapshot to the metrics topic."""
    await metrics_topic.send(key=_WORKER.encode(), value=snapshot())


app.timer(interval=settings.metrics_interval_s)(broadcast_metrics)

"""Event-to-prediction latency: from the input record's Kafka timestamp (its ``CreateTime``,
ms) to the moment its prediction is handed to the producer.

The serving path records one numpy array per micro-batch (:meth:`EventLatency.record`): it
goes into a fixed-bucket histogram (``stratum_event_latency_seconds`` on ``GET /metrics``,
no labels) and into a ring of recent arrays bounded by :data:`MAX_RECENT` latencies. The
dashboard's sampler takes the ring every few seconds (:meth:`EventLatency.take`) and keeps the
p50 and p99 of that window. No per-event Python work: a batch costs a few numpy calls.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["BUCKETS_S", "MAX_RECENT", "EventLatency", "LatencyCollector", "latencies_ms",
           "percentiles"]

#: Upper bounds (seconds) of the histogram's buckets.
BUCKETS_S = (.005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Most latencies kept between two samples (the newest; older batches are dropped first).
MAX_RECENT = 65536


def latencies_ms(now_ms: int, timestamps_ms: np.ndarray) -> np.ndarray:
    """The latencies (ms) of records stamped ``timestamps_ms`` answered at ``now_ms``: a
    record without a timestamp (``<= 0``) is left out; one ahead of this clock counts as 0."""
    ts = timestamps_ms[timestamps_ms > 0]
    latencies: np.ndarray = np.maximum(now_ms - ts, 0).astype(np.float64)
    return latencies


def percentiles(latencies_ms: np.ndarray) -> tuple[float, float] | None:
    """(p50, p99) of ``latencies_ms`` in milliseconds, or None for none."""
    if not len(latencies_ms):
        return None
    p50, p99 = np.percentile(latencies_ms, (50, 99))
    return round(float(p50), 3), round(float(p99), 3)


class EventLatency:
    """This worker's latencies: a cumulative histogram and the latencies since the last take."""

    def __init__(self, max_recent: int = MAX_RECENT,
                 buckets_s: tuple[float, ...] = BUCKETS_S) -> None:
        self.max_recent = max_recent
        self.bounds_ms = np.asarray(buckets_s, dtype=np.float64) * 1000.0
        self.buckets_s = buckets_s
        #: Events per bucket (the last one is +Inf), not cumulative.
        self.counts = np.zeros(len(buckets_s) + 1, dtype=np.int64)
        self.sum_ms = 0.0
        self._recent: deque[np.ndarray] = deque()
        self._recent_n = 0

    def record(self, now_ms: int, timestamps_ms: np.ndarray) -> None:
        """Record the latencies of events whose records carry ``timestamps_ms`` and whose
        predictions were handed to the producer at ``now_ms``. A record without a timestamp
        (``<= 0``) is not counted; a timestamp ahead of this clock counts as 0."""
        latencies = latencies_ms(now_ms, timestamps_ms)
        if not len(latencies):
            return
        if len(latencies) > self.max_recent:
            latencies = latencies[-self.max_recent:]
        self.counts += np.bincount(np.searchsorted(self.bounds_ms, latencies, side="left"),
                                   minlength=len(self.counts))
        self.sum_ms += float(latencies.sum())
        self._recent.append(latencies)
        self._recent_n += len(latencies)
        while self._recent_n > self.max_recent:
            self._recent_n -= len(self._recent.popleft())

    def take(self) -> np.ndarray:
        """The latencies recorded since the last take (at most :attr:`max_recent`), in ms."""
        if not self._recent:
            return np.empty(0, dtype=np.float64)
        out = np.concatenate(list(self._recent))
        self._recent.clear()
        self._recent_n = 0
        return out

    @property
    def recent(self) -> int:
        """Latencies waiting for the next take."""
        return self._recent_n


class LatencyCollector(Collector):
    """``stratum_event_latency_seconds`` from an :class:`EventLatency`'s histogram."""

    def __init__(self, latency: EventLatency) -> None:
        self.latency = latency

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = np.cumsum(self.latency.counts).tolist()
        buckets = [(repr(float(b)), float(c))
                   for b, c in zip(self.latency.buckets_s, cumulative)]
        buckets.append(("+Inf", float(cumulative[-1])))
        yield HistogramMetricFamily(
            "stratum_event_latency_seconds",
            "Time from an input record's Kafka timestamp to its prediction being handed to "
            "the producer", buckets=buckets, sum_value=self.latency.sum_ms / 1000.0)

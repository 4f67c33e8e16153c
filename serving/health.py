"""The candidate's health during a rollout: its scoring failures and its latency, judged by
every serving worker on what it scored itself.

Errors and latency happen where scoring happens, so each worker keeps, for the candidate in
rollout now only, the number of events it tried to score with it, how many of those failed
(its forward pass raised: the serving version answered them instead), and the latencies of
the canary predictions the candidate answered (a ring of the newest :data:`MAX_LATENCIES`).
Once :attr:`CandidateHealth.min_events` events were tried, :meth:`CandidateHealth.verdict`
names a limit crossed: an error rate above ``ROLLOUT_MAX_ERROR_RATE``, or a p99 latency above
``ROLLOUT_MAX_LATENCY_MS`` (0: no limit). The worker then publishes one ``ABORT`` (``by``
``"policy"``); a second one, from this or another worker, is a stale decision the fold ignores.

Everything resets when the candidate changes (another version, or the same announced again).
Per micro-batch the cost is a few numpy calls.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.latency import latencies_ms, percentiles

__all__ = ["MAX_LATENCIES", "CandidateHealth", "Unhealthy"]

#: Most latencies kept for the p99 (the newest; older micro-batches are dropped first).
MAX_LATENCIES = 20_000


@dataclass(frozen=True)
class Unhealthy:
    """A limit the candidate crossed: why, and the figures it was judged on."""

    reason: str
    figures: dict[str, Any]


class CandidateHealth:
    """One worker's view of the candidate's failures and latency (see the module)."""

    def __init__(self, max_error_rate: float, max_latency_ms: float, min_events: int,
                 max_latencies: int = MAX_LATENCIES) -> None:
        self.max_error_rate = max_error_rate
        self.max_latency_ms = max_latency_ms
        self.min_events = min_events
        self.max_latencies = max_latencies
        #: The rollout followed: ``(candidate version, offset of its announcement)``.
        self.key: tuple[str, int] | None = None
        self.attempts = 0
        self.failures = 0
        self._latencies: deque[np.ndarray] = deque()
        self._latency_n = 0
        #: The rollout this worker already published an ``ABORT`` for.
        self.decided: tuple[str, int] | None = None

    def follow(self, key: tuple[str, int] | None) -> None:
        """Judge the rollout ``key`` (None: none in progress); a new one starts afresh."""
        if key != self.key:
            self.key = key
            self.attempts = self.failures = 0
            self._latencies.clear()
            self._latency_n = 0

    def scored(self, n: int, failed: bool = False) -> None:
        """``n`` events were given to the candidate; all of them failed when ``failed``."""
        self.attempts += n
        if failed:
            self.failures += n

    def answered(self, now_ms: int, timestamps_ms: np.ndarray) -> None:
        """The candidate's predictions of records stamped ``timestamps_ms`` were handed to
        the producer at ``now_ms``."""
        latencies = latencies_ms(now_ms, timestamps_ms)
        if not len(latencies):
            return
        if len(latencies) > self.max_latencies:
            latencies = latencies[-self.max_latencies:]
        self._latencies.append(latencies)
        self._latency_n += len(latencies)
        while self._latency_n > self.max_latencies:
            self._latency_n -= len(self._latencies.popleft())

    @property
    def latencies(self) -> int:
        """Latencies kept now (at most ``max_latencies``)."""
        return self._latency_n

    @property
    def error_rate(self) -> float:
        return self.failures / self.attempts if self.attempts else 0.0

    def p99_ms(self) -> float | None:
        """The p99 of the latencies kept, None for none."""
        if not self._latencies:
            return None
        found = percentiles(np.concatenate(list(self._latencies)))
        return None if found is None else found[1]

    def verdict(self) -> Unhealthy | None:
        """The limit crossed, once at least ``min_events`` events were tried; else None."""
        if self.key is None or self.attempts < self.min_events:
            return None
        figures: dict[str, Any] = {
            "test": "health", "attempts": self.attempts, "failures": self.failures,
            "error_rate": round(self.error_rate, 6), "max_error_rate": self.max_error_rate,
            "min_events": self.min_events}
        p99 = self.p99_ms()
        if p99 is not None:
            figures.update(p99_latency_ms=p99, latencies=self._latency_n)
        figures["max_latency_ms"] = self.max_latency_ms
        if self.error_rate > self.max_error_rate:
            return Unhealthy(f"error rate {self.error_rate:.3f} > ROLLOUT_MAX_ERROR_RATE "
                             f"{self.max_error_rate:g} over {self.attempts} events", figures)
        if self.max_latency_ms > 0 and p99 is not None and p99 > self.max_latency_ms:
            return Unhealthy(f"p99 latency {p99:.0f} ms > ROLLOUT_MAX_LATENCY_MS "
                             f"{self.max_latency_ms:g} over {self._latency_n} predictions",
                             figures)
        return None

"""Whether this worker may still act for the partitions it was given: a lease on its place
in the group, for the writes a worker that lost its partitions must not make.

The group hands a worker's partitions to the others once it has sent no heartbeat for
``WORKER_SESSION_TIMEOUT_S``. A worker that was frozen (SIGSTOP, a VM paused, a long swap
storm) that long wakes up still believing it holds them, and before its first heartbeat tells
it otherwise it may write what it buffered: lake files overlapping the new owner's, or a
speed-layer update with a sequence number the new learner also uses. Both are writes outside
Kafka's fencing, so the worker fences itself: a clock ticks twice a second, and a gap of more
than half the session timeout between ticks (or since the last one) means the worker may have
lost its partitions. Until the next assignment confirms them, or until ``settle_s`` passes
without one (the group would have told it within a few heartbeats), lake writes and update
publications wait; partitions revoked in the meantime drop what they buffered instead of
writing it, and their next owner reads it again from the committed offset.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

__all__ = ["Lease", "worker_lease"]

log = logging.getLogger(__name__)


class Lease:
    """A worker's lease on its partitions, judged from its own clock.

    Parameters
    ----------
    session_timeout_s : float
        The group's session timeout: after that long without a heartbeat, the worker's
        partitions may be someone else's.
    settle_s : float
        How long after a stall the lease stays doubtful without an assignment: by then the
        heartbeats of a worker that was dropped from the group have told it so.
    clock : callable
        Monotonic seconds (tests give their own).
    """

    def __init__(self, session_timeout_s: float, settle_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_limit_s = session_timeout_s / 2
        self.settle_s = settle_s
        self._clock = clock
        self._last_tick = clock()
        self._doubtful_since: float | None = None
        #: Stalls seen so far.
        self.stalls = 0

    def tick(self) -> None:
        """Called every fraction of a second while the worker runs."""
        self._check(self._clock())

    @property
    def held(self) -> bool:
        """Whether writes on behalf of the worker's partitions may go ahead now."""
        now = self._clock()
        self._check(now)
        if self._doubtful_since is None:
            return True
        if now - self._doubtful_since >= self.settle_s:
            log.info("no rebalance followed the stall: this worker kept its partitions")
            self._doubtful_since = None
            return True
        return False

    def confirmed(self) -> None:
        """A new assignment: the partitions the worker holds now are its own."""
        self._doubtful_since = None
        self._last_tick = self._clock()

    def _check(self, now: float) -> None:
        gap = now - self._last_tick
        self._last_tick = now
        if gap > self.stall_limit_s:
            self.stalls += 1
            self._doubtful_since = now
            log.warning("this worker was stalled for %.0fs, more than half the group's session "
                        "timeout: its partitions may be another worker's now, so it writes to "
                        "the lake and publishes updates only once the group confirms them",
                        gap)


def _worker_lease() -> Lease:
    from app import app

    lease = Lease(app.settings.worker_session_timeout_s)

    async def lease_clock() -> None:
        lease.tick()

    app.timer(0.5, name="lease_clock")(lease_clock)
    return lease


#: This worker's lease, shared by the lake archive and the speed layer.
worker_lease = _worker_lease()

"""Table recovery that finishes even when a changelog is emptied under it.

Faust reads each active changelog partition's high-water mark once, when recovery starts, and
waits until it has applied the record at that offset. ``latest_predictions``' changelog is
``compact,delete``: once its newest record is older than ``LATEST_RETENTION_S`` (a worker
stopped overnight), the broker's retention check deletes every segment, the last one
included, at whatever moment its next check runs. If that moment falls after recovery read
the high-water mark, the record recovery waits for no longer exists, its consumer is reset
to the new log start past it, and recovery waits forever ("Still fetching changelog topics
for recovery", the remaining count frozen).

:class:`RecoveryWatchdog` checks, while recovery runs, whether a partition's log now starts
past the offset recovery waits for; if so nothing it waits for can arrive, and it marks that
partition recovered. Faust's recovery loop then ends at its next idle check (every 5 s).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Mapping

from app import app

__all__ = ["RecoveryWatchdog", "truncated_partitions", "recovery_watchdog"]

log = logging.getLogger(__name__)

#: Seconds between two checks while a recovery runs.
CHECK_INTERVAL_S = 2.0


def truncated_partitions(highwaters: Mapping[Any, int | None],
                         applied: Mapping[Any, int | None],
                         log_starts: Mapping[Any, int]) -> dict[Any, int]:
    """Partitions whose recovery waits for a record the log no longer has.

    Parameters
    ----------
    highwaters
        The offset recovery waits to apply, per partition (None: nothing to wait for).
    applied
        The last offset applied, per partition (None: none yet).
    log_starts
        The first offset the log still holds, per partition.

    Returns
    -------
    dict
        ``partition -> high-water mark`` for each partition still waiting whose log starts
        past its high-water mark.
    """
    out = {}
    for tp, highwater in highwaters.items():
        if highwater is None or highwater < 0:
            continue
        done = applied.get(tp)
        if done is not None and done >= highwater:
            continue
        start = log_starts.get(tp)
        if start is not None and start > highwater:
            out[tp] = highwater
    return out


class RecoveryWatchdog:
    """Marks changelog partitions recovered when the log was emptied under the recovery.

    It starts with the worker's first partition assignment: a service of the app would start
    only once the first recovery is over, which is too late for this one.
    """

    def __init__(self) -> None:
        self._running: asyncio.Future[None] | None = None

    async def on_partitions_assigned(self, sender: Any, assigned: Any, **kwargs: Any) -> None:
        if self._running is None or self._running.done():
            self._running = app.add_future(self._watch())

    async def _watch(self) -> None:
        while not app.should_stop:
            await asyncio.sleep(CHECK_INTERVAL_S)
            tables: Any = app.tables  # Faust's TableManager; its type omits recovery
            recovery = tables.recovery
            if not recovery.in_recovery:
                continue
            try:
                await self.check(recovery)
            except Exception as exc:  # the consumer may be rebalancing: try again later
                log.debug("recovery check failed: %s", exc)

    async def check(self, recovery: Any) -> None:
        """Mark as recovered every active partition whose log lost what recovery waits for."""
        highwaters = dict(recovery.active_highwaters)
        offsets = recovery.active_offsets
        waiting = [tp for tp, hw in highwaters.items()
                   if hw is not None and (offsets.get(tp) is None or offsets[tp] < hw)]
        if not waiting:
            return
        starts = await app.consumer.earliest_offsets(*waiting)
        for tp, highwater in truncated_partitions(highwaters, offsets, starts).items():
            log.warning("changelog %s[%d] was emptied during recovery (its log now starts at "
                        "%d, past offset %d that recovery waited for): nothing more to "
                        "recover there", tp.topic, tp.partition, starts[tp], highwater)
            offsets[tp] = highwater


recovery_watchdog = RecoveryWatchdog()
# Faust's signal type wants a handler taking ``signal=``; it is passed in ``**kwargs``.
app.on_partitions_assigned.connect(
    recovery_watchdog.on_partitions_assigned)  # type: ignore[arg-type]

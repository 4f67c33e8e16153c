"""Running the batch job on a cron schedule, one run at a time."""
from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Callable

__all__ = ["next_run", "run_schedule"]

log = logging.getLogger(__name__)


def next_run(cron: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` (UTC) that matches ``cron``."""
    from croniter import croniter

    found: datetime = croniter(cron, after.astimezone(timezone.utc)).get_next(datetime)
    return found


def run_schedule(cron: str, run: Callable[[], int],
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[str], None] = log.info,
                 max_runs: int | None = None) -> int:
    """Call ``run`` at every ``cron`` time; return after ``max_runs`` runs (default: never).

    The next time is computed only once a run has ended, from the time it ended, so runs never
    overlap and the times missed while a long run was going are skipped rather than caught up.
    A failing run (non-zero status or exception) is reported and the schedule goes on.

    Parameters
    ----------
    cron : str
        Cron expression in UTC, e.g. ``"0 2 * * *"``.
    run : callable
        One batch run; returns its exit status.
    now, sleep : callable
        Clock and sleep (injectable for tests).
    progress : callable
        Receives one line per event.
    max_runs : int, optional
        Stop after this many runs.

    Returns
    -------
    int
        Number of runs done.
    """
    done = 0
    while max_runs is None or done < max_runs:
        due = next_run(cron, now())
        progress(f"next run at {due.isoformat()} (BATCH_CRON={cron!r})")
        while (wait := (due - now()).total_seconds()) > 0:
            # Short sleeps keep the loop responsive to clock changes and signals.
            sleep(min(wait, 60.0))
        progress("starting a run")
        try:
            status = run()
        except Exception as exc:  # the scheduler outlives any single run
            log.exception("batch run failed")
            progress(f"run failed: {type(exc).__name__}: {exc}")
        else:
            progress(f"run ended with exit status {status}")
        done += 1
    return done

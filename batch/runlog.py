"""A record of every batch run on the metrics topic, so failures are visible where people look.

Each run of ``python -m batch run`` (and so each scheduled run) ends by sending one JSON object
to ``METRICS_TOPIC``::

    {"type": "batch-run", "model": "default", "status": "published" | "rejected" | "failed"
     | "skipped", "exit_code": 0, "reason": "...", "version": "..." | null,
     "metrics": {...}, "rows": {...}, "timings": {"read": 3.2, ...},
     "started_at": "...Z", "ended_at": "...Z"}

Sending is best effort: a broker that is down is logged and never changes the run's exit status.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Mapping

from app.settings import Settings

__all__ = ["RUN_RECORD_TYPE", "publish_run_record"]

log = logging.getLogger(__name__)

#: ``"type"`` of a batch run record on the metrics topic.
RUN_RECORD_TYPE = "batch-run"


async def _send(settings: Settings, record: Mapping[str, Any], timeout_s: float) -> None:
    from aiokafka import AIOKafkaProducer

    from transport.topics import ensure_topics

    topic = settings.metrics_topic
    await asyncio.wait_for(ensure_topics(settings, [topic], timeout_s=timeout_s), timeout_s)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                                request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(producer.start(), timeout_s)
    try:
        key = str(record.get("model", "")).encode("utf-8")
        await asyncio.wait_for(producer.send_and_wait(
            topic, json.dumps(record, sort_keys=True, default=str).encode("utf-8"), key=key),
            timeout_s)
    finally:
        await producer.stop()


def publish_run_record(settings: Settings, record: Mapping[str, Any],
                       timeout_s: float = 15.0) -> bool:
    """Send ``record`` (``"type"`` set to :data:`RUN_RECORD_TYPE`) to the metrics topic.

    Returns True when the broker acknowledged it, False (logged) otherwise.
    """
    body = {"type": RUN_RECORD_TYPE, **record}
    try:
        asyncio.run(asyncio.wait_for(_send(settings, body, timeout_s), timeout_s * 2))
    except Exception as exc:  # best effort: the exit status and the log still tell
        text = str(exc).strip().splitlines()
        log.info("could not send the run record to %r: %s", settings.metrics_topic,
                    f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)
        return False
    return True

"""Announcing a published model version on the update topic (the ``MODEL-REF`` message of
:mod:`transport.protocol`)."""
from __future__ import annotations

import asyncio
import logging

from app.settings import Settings
from batch.errors import AnnounceError
from transport.protocol import ModelRef, encode

__all__ = ["announce", "announce_async"]

log = logging.getLogger(__name__)


async def announce_async(settings: Settings, ref: ModelRef, timeout_s: float = 30.0) -> None:
    """Create the update topic if needed and send ``ref``'s MODEL-REF, waiting for the ack.

    The message is keyed by model name. Raises :class:`AnnounceError` with the reason when the
    broker cannot be reached or does not acknowledge in ``timeout_s``.
    """
    from aiokafka import AIOKafkaProducer

    from transport.topics import ensure_topics

    topic = settings.updates_topic
    producer = None
    try:
        await asyncio.wait_for(ensure_topics(settings, [topic], timeout_s=timeout_s),
                               timeout_s)
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all",
                                    request_timeout_ms=int(timeout_s * 1000))
        await asyncio.wait_for(producer.start(), timeout_s)
        metadata = await asyncio.wait_for(
            producer.send_and_wait(topic, encode(ref), key=ref.name.encode("utf-8")),
            timeout_s)
    except Exception as exc:  # aiokafka, timeouts and OS errors alike
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        raise AnnounceError(f"published {ref.name}/{ref.version} but could not announce it "
                            f"on {topic!r} at {settings.bootstrap_servers}: {reason}") from exc
    finally:
        if producer is not None:
            try:
                await producer.stop()
            except Exception:  # closing a producer that never connected may fail too
                log.debug("producer stop failed", exc_info=True)
    log.info("announced %s/%s on %s (partition %d, offset %d)", ref.name, ref.version, topic,
             metadata.partition, metadata.offset)


def announce(settings: Settings, ref: ModelRef, timeout_s: float = 30.0) -> None:
    """Blocking :func:`announce_async`."""
    asyncio.run(announce_async(settings, ref, timeout_s))

"""Which version of a model is serving now, and which one is pinned: read from the update topic.

The update topic is the system's record of what was announced: the newest ``MODEL-REF`` of a
model is the version workers serve, unless an operator pinned one with a ``PIN`` message
(``{"type": "PIN", "model": ..., "version": ... | null}``; ``null`` releases the pin). The
batch job compares its candidate with the active version, and generation clean-up never deletes
the active or the pinned version. Where the topic cannot be read, the registry's newest version
stands in for the active one.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from app.settings import Settings
from models.errors import MessageError
from models.registry import MODEL_REF_TYPE, ModelRef

__all__ = ["PIN_TYPE", "UpdateState", "fold_updates", "read_update_state"]

log = logging.getLogger(__name__)

#: ``"type"`` of the update-topic message that pins (or, with a null version, unpins) a version.
PIN_TYPE = "PIN"


@dataclass(frozen=True)
class UpdateState:
    """What the update topic says about one model.

    Attributes
    ----------
    active : ModelRef or None
        The newest valid MODEL-REF of the model.
    pinned : str or None
        The version of the newest PIN message, None when there is none or it was released.
    source : str
        ``"topic"``, or ``"registry"`` when the topic could not be read.
    """

    active: ModelRef | None
    pinned: str | None
    source: str = "topic"

    @property
    def active_version(self) -> str | None:
        """The pinned version if any, else the newest announced one: what serves now."""
        return self.pinned or (self.active.version if self.active else None)

    def protected(self) -> set[str]:
        """Versions generation clean-up must keep: the active and the pinned one."""
        return {v for v in (self.pinned, self.active.version if self.active else None) if v}


def fold_updates(messages: Iterable[Any], model: str) -> UpdateState:
    """Fold decoded update messages (oldest first) into the :class:`UpdateState` of ``model``.

    Malformed messages and other models' messages are skipped; a PIN without a ``"model"``
    field applies to every model.
    """
    active: ModelRef | None = None
    pinned: str | None = None
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        kind = message.get("type")
        if kind == MODEL_REF_TYPE and message.get("model") == model:
            try:
                active = ModelRef.from_message(message)
            except MessageError as exc:
                log.warning("ignoring a malformed MODEL-REF on the update topic: %s", exc)
        elif kind == PIN_TYPE and message.get("model", model) == model:
            version = message.get("version")
            pinned = version if isinstance(version, str) and version else None
    return UpdateState(active=active, pinned=pinned)


async def _partitions(settings: Settings, timeout_s: float) -> list[int]:
    """Partition ids of the update topic; empty when it does not exist yet."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers,
                                request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        if settings.updates_topic not in set(await admin.list_topics()):
            return []
        (topic,) = await admin.describe_topics([settings.updates_topic])
        return sorted(p["partition"] for p in topic["partitions"])
    finally:
        await admin.close()


async def _read_topic(settings: Settings, timeout_s: float) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    ids = await _partitions(settings, timeout_s)
    if not ids:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(consumer.start(), timeout_s)
    try:
        tps = [TopicPartition(settings.updates_topic, p) for p in ids]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout_s)
        records: list[tuple[int, int, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            if loop.time() > deadline:
                raise TimeoutError(f"reading {settings.updates_topic!r} took over {timeout_s}s")
            batches = await consumer.getmany(timeout_ms=500)
            for tp, rows in batches.items():
                for row in rows:
                    try:
                        value = json.loads(row.value) if row.value is not None else None
                    except ValueError:
                        continue
                    records.append((row.timestamp, row.offset, value))
        # Messages of one model share a key and so a partition; ordering by broker time
        # merges partitions for messages without one.
        records.sort(key=lambda r: (r[0], r[1]))
        return [value for _, _, value in records]
    finally:
        await consumer.stop()


def read_update_state(settings: Settings, model: str, timeout_s: float = 20.0,
                      registry: Any = None) -> UpdateState:
    """The :class:`UpdateState` of ``model`` from the update topic.

    When the broker cannot be reached in ``timeout_s``, falls back to the registry's newest
    version as the active one (``source="registry"``; no pin is known then), so a rebuild can
    still compare against what most probably serves.
    """
    try:
        messages = asyncio.run(asyncio.wait_for(_read_topic(settings, timeout_s),
                                                timeout_s * 2))
        return fold_updates(messages, model)
    except Exception as exc:  # broker down, timeouts: fall back, never fail the run over it
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        log.warning("cannot read %r (%s); using the registry's newest version as the active "
                    "one", settings.updates_topic, reason)
    if registry is None:
        return UpdateState(active=None, pinned=None, source="registry")
    return UpdateState(active=registry.latest(model), pinned=None, source="registry")

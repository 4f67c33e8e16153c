"""Which version of a model is serving now, which one is pinned, which are refused: the batch
layer's reading of the update topic.

The topic's records, in offset order, are folded with :func:`transport.protocol.fold`, the same
fold serving workers use, and the ledger is then settled (:func:`transport.protocol.settle`):
the version :func:`~transport.protocol.should_serve` names is verified with the registry's check
(:meth:`models.registry.Registry.load_ref`) and refused when it fails, as a worker refuses a
version it cannot load, until one verifies. The batch job compares its candidate with that
version, and generation clean-up never deletes a :func:`~transport.protocol.protected` version
(of the topic as read and of the settled ledger). Where the topic cannot be read, the registry's
newest version stands in for the active one.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from app.settings import Settings
from transport.protocol import (Ledger, ModelRef, Record, Rollout, protected, replay, settle,
                                should_serve)

__all__ = ["UpdateState", "update_state", "read_update_state"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateState:
    """What the update topic (and verification) says about one model.

    Attributes
    ----------
    active : ModelRef or None
        The version that serves: the pinned one if it verifies, else the newest announced one
        that verifies; None when there is none.
    pinned : str or None
        The version of the newest PIN, None when there is none or it was lifted.
    refused : mapping of version to reason
        Versions whose artifact failed verification.
    source : str
        ``"topic"``, or ``"registry"`` when the topic could not be read.
    keep : frozenset of str
        Versions generation clean-up must keep.
    """

    active: ModelRef | None
    pinned: str | None
    refused: Mapping[str, str] = field(default_factory=dict)
    source: str = "topic"
    keep: frozenset[str] = frozenset()

    @property
    def active_version(self) -> str | None:
        """The version serving now."""
        return self.active.version if self.active is not None else None

    def protected(self) -> set[str]:
        """Versions generation clean-up must keep: the active one, the pinned one, and the one
        serving once the pin is lifted, whether or not this reader could verify them."""
        return set(self.keep) | {v for v in (self.pinned, self.active_version) if v}


def update_state(records: Iterable[Record], model: str,
                 verify: Callable[[ModelRef], Any] | None = None,
                 rollout: Rollout | None = None) -> UpdateState:
    """The :class:`UpdateState` of ``model`` from the update topic's records.

    Parameters
    ----------
    records : iterable of Record
        The topic's records (its one partition), folded in offset order whatever their
        producer timestamps.
    model : str
        The model to follow.
    verify : callable, optional
        Checks a version's artifact and raises when it does not verify (the registry's
        ``load_ref``); without it nothing is refused.
    rollout : Rollout, optional
        How an announcement without a ``rollout`` goes live (``ROLLOUT_MODE``): a candidate
        in rollout is not the active version (see :func:`transport.protocol.candidate`).
    """
    start = Ledger(model, rollout=rollout) if rollout is not None else Ledger(model)
    ledger: Ledger = replay(sorted(records, key=lambda r: r.offset), model, start)
    keep = protected(ledger)
    if verify is not None:
        ledger = settle(ledger, verify)
        keep |= protected(ledger)
        for version, reason in ledger.refused.items():
            log.warning("version %s/%s does not verify, so no worker serves it: %s", model,
                        version, reason)
    serving = should_serve(ledger)
    return UpdateState(active=ledger.announced[serving] if serving else None,
                       pinned=ledger.pinned, refused=dict(ledger.refused), keep=keep)


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


async def _read_topic(settings: Settings, timeout_s: float) -> list[Record]:
    """Every record of the update topic, in offset order (partition 0: the topic has one, and
    it is the one serving workers follow)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    if not await _partitions(settings, timeout_s):
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(consumer.start(), timeout_s)
    try:
        tp = TopicPartition(settings.updates_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await asyncio.wait_for(consumer.end_offsets([tp]), timeout_s))[tp]
        records: list[Record] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while await consumer.position(tp) < end:
            if loop.time() > deadline:
                raise TimeoutError(f"reading {settings.updates_topic!r} took over {timeout_s}s")
            batch = await consumer.getmany(tp, timeout_ms=500)
            records.extend(Record(row.offset, row.value, row.timestamp)
                           for row in batch.get(tp, []))
        return records
    finally:
        await consumer.stop()


def read_update_state(settings: Settings, model: str, timeout_s: float = 20.0,
                      registry: Any = None,
                      verify: Callable[[ModelRef], Any] | None = None) -> UpdateState:
    """The :class:`UpdateState` of ``model`` from the update topic (see :func:`update_state`;
    ``verify`` defaults to ``registry.load_ref`` when a registry is given).

    When the broker cannot be reached in ``timeout_s``, falls back to the registry's newest
    version as the active one (``source="registry"``; no pin is known then), so a rebuild can
    still compare against what most probably serves.
    """
    if verify is None and registry is not None:
        verify = registry.load_ref
    try:
        records = asyncio.run(asyncio.wait_for(_read_topic(settings, timeout_s),
                                               timeout_s * 2))
    except Exception as exc:  # broker down, timeouts: fall back, never fail the run over it
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        log.warning("cannot read %r (%s); using the registry's newest version as the active "
                    "one", settings.updates_topic, reason)
    else:
        return update_state(records, model, verify, Rollout(
            mode=settings.rollout_mode, share=settings.rollout_canary_share))
    if registry is None:
        return UpdateState(active=None, pinned=None, source="registry")
    return UpdateState(active=registry.latest(model), pinned=None, source="registry")

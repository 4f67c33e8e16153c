"""Which model this worker serves, and how it changes.

Every worker reads the whole update topic with a consumer of its own (no consumer group), so
each one hears every announcement: an agent on the topic would reach only one worker of the
group. At start it replays the history and loads the newest announced version that passes
verification; afterwards each new MODEL-REF is loaded and verified in a thread and switched
in atomically; the serving agent picks up :attr:`ModelManager.active` between micro-batches.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from app import app
from models.errors import ModelError
from models.registry import ModelRef, Registry
from models.serving import LoadedModel

settings = app.settings

__all__ = ["ModelManager", "model_manager", "SwapRecord"]

log = logging.getLogger(__name__)


@dataclass
class SwapRecord:
    """One model change (or refusal) as shown by ``GET /models/``."""

    version: str
    at: float
    reason: str | None = None
    load_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "at": self.at}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.load_s is not None:
            out["load_s"] = round(self.load_s, 3)
        return out


@dataclass
class ModelLedger:
    """What the manager knows; only the event loop mutates it."""

    active: LoadedModel | None = None
    history: deque[SwapRecord] = field(default_factory=lambda: deque(maxlen=50))
    last_swap: SwapRecord | None = None
    last_refusal: SwapRecord | None = None
    refusals: int = 0
    ignored_messages: int = 0


class ModelManager(Service):
    """Per-worker follower of the update topic that owns the active model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ledger = ModelLedger()
        self.registry = Registry(settings.registry_uri, settings.storage_options)
        self._ready = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def active(self) -> LoadedModel | None:
        """The model serving now, or None before the first one is loaded."""
        return self.ledger.active

    async def wait_ready(self) -> LoadedModel:
        """Wait until a model is active and return it."""
        await self._ready.wait()
        assert self.ledger.active is not None
        return self.ledger.active

    async def on_start(self) -> None:
        tp = TopicPartition(settings.updates_topic, 0)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest")
        await self._consumer.start()
        self._consumer.assign([tp])
        await self._consumer.seek_to_beginning(tp)

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    @Service.task
    async def _follow_updates(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        tp = TopicPartition(settings.updates_topic, 0)
        end = (await consumer.end_offsets([tp]))[tp]
        # Replay the history first: only the newest loadable announcement matters.
        history: list[ModelRef] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                ref = self._parse(record.value, record.offset)
                if ref is not None:
                    history.append(ref)
        for ref in reversed(history):
            if await self._load_and_swap(ref):
                break
        if self.ledger.active is None:
            log.info("no model announced yet on %s; /ready answers 503 until one is",
                     settings.updates_topic)
        while not self.should_stop:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                ref = self._parse(record.value, record.offset)
                if ref is not None:
                    await self._load_and_swap(ref)

    def _parse(self, raw: bytes | None, offset: int) -> ModelRef | None:
        """The MODEL-REF for our model in one update message, or None to skip it."""
        try:
            message = json.loads(raw or b"")
            kind = message.get("type") if isinstance(message, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            kind, message = None, None
        if kind == "UP":
            return None  # incremental updates are applied by the speed layer's follower
        if kind != "MODEL-REF":
            self.ledger.ignored_messages += 1
            log.warning("ignored update message at %s offset %d: unknown type %r",
                        settings.updates_topic, offset, kind)
            return None
        try:
            ref = ModelRef.from_message(message)
        except ModelError as exc:
            self._refuse(str(message.get("version", "?")), f"bad announcement: {exc}")
            return None
        if ref.name != settings.model_name:
            return None
        return ref

    async def _load_and_swap(self, ref: ModelRef) -> bool:
        """Load and verify ``ref`` off the event loop; switch to it if it passes."""
        current = self.ledger.active
        if current is not None and current.version == ref.version:
            return True
        started = time.monotonic()
        try:
            model = await asyncio.get_running_loop().run_in_executor(
                None, self.registry.load, ref.manifest_uri, ref.sha256)
        except ModelError as exc:
            self._refuse(ref.version, str(exc))
            return False
        except Exception as exc:  # S3 unreachable, corrupt bytes...: refuse, keep serving
            self._refuse(ref.version, f"{type(exc).__name__}: {exc}")
            return False
        incompatible = _incompatibility(current, model)
        if incompatible:
            self._refuse(ref.version, incompatible)
            return False
        record = SwapRecord(ref.version, time.time(), load_s=time.monotonic() - started)
        self.ledger.active = model
        self.ledger.last_swap = record
        self.ledger.history.append(record)
        self._ready.set()
        log.info("serving model %s version %s (loaded in %.2fs)", ref.name, ref.version,
                 record.load_s)
        return True

    def _refuse(self, version: str, reason: str) -> None:
        record = SwapRecord(version, time.time(), reason=reason)
        self.ledger.last_refusal = record
        self.ledger.refusals += 1
        self.ledger.history.append(record)
        log.error("refused model version %s: %s", version, reason)

    def describe(self) -> dict[str, Any]:
        """The JSON body of ``GET /models/``."""
        active = self.ledger.active
        return {
            "model": settings.model_name,
            "active": active.version if active else None,
            "features": list(active.features) if active else None,
            "classes": list(active.classes) if active else None,
            "metrics": active.metrics if active else None,
            "last_swap": self.ledger.last_swap.as_dict() if self.ledger.last_swap else None,
            "last_refusal": (self.ledger.last_refusal.as_dict()
                             if self.ledger.last_refusal else None),
            "refusals": self.ledger.refusals,
            "history": [r.as_dict() for r in self.ledger.history],
        }


def _incompatibility(current: LoadedModel | None, new: LoadedModel) -> str | None:
    """Why ``new`` cannot replace ``current`` under live traffic, or None."""
    if current is None:
        return None
    if set(new.features) != set(current.features):
        missing = sorted(set(current.features) - set(new.features))
        extra = sorted(set(new.features) - set(current.features))
        return f"incompatible features: missing {missing[:5]}, unexpected {extra[:5]}"
    return None


model_manager = ModelManager()
app.service(model_manager)

"""Which model this worker serves, and how it changes.

Every worker reads the whole update topic with a consumer of its own (no consumer group), so
each one hears every message: an agent on the topic would reach only one worker of the group.
The topic is the single source of truth, shared by all workers and kept forever, so replaying it
gives every worker, restarted or new, the same state. Its messages:

``MODEL-REF``
    A new base version from the batch layer. Unless a version is pinned, the worker loads it in
    a thread, verifies it (checksums, schema, reference rows, a network it may build: a user's
    factory only when ``MODEL_FACTORIES`` lists it; task, features and classes compatible with
    what is serving) and switches to it between micro-batches; a version that fails is refused
    with its reason and the old model keeps serving.
``UP``
    An incremental update from the speed layer (:class:`models.online.ModelUpdate`): applied
    only to its base version, in ``seq`` order; stale ones (seq not above the last applied) are
    dropped, and updates for another base are kept aside in case that base serves again.
``PIN``
    An operator's choice (``POST /models/pin`` or ``/models/rollback``): serve this version,
    whatever is announced later, until a PIN with ``"version": null`` lifts it.
``PROMOTE``, ``ABORT``
    The end of a rollout. A ``MODEL-REF`` in ``shadow`` or ``canary`` mode (its own
    ``rollout``, else ``ROLLOUT_MODE``) does not replace what serves: the worker loads it as
    the *candidate* (verified as above, and compatible with the serving base) and serving
    routes to it alongside the serving version (:meth:`ModelManager.routing`) until a
    ``PROMOTE`` makes it the serving version or an ``ABORT`` drops it. A candidate gets no
    ``UP`` updates while in rollout.

Anything else is logged, counted and shown as a refusal in ``GET /models/``.

The messages, and the fold of the topic into what should serve, are :mod:`transport.protocol`'s,
shared with the batch layer: this worker's :class:`~transport.protocol.Ledger` is the topic
folded in offset order plus the versions this worker refused, and it serves
:func:`~transport.protocol.should_serve` of it, falling back version by version while loading
fails, whether it is replaying the topic at start or following it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from serving.metrics import MODEL_REFUSAL_REASONS, record_model_state
from app import app
from models.errors import ModelError
from models.registry import Registry
from models.loaded import LoadedModel
from transport import protocol
from transport.protocol import Candidate, ModelRef, ModelUpdate, Record

settings = app.settings

__all__ = ["ModelManager", "model_manager", "SwapRecord", "pin_message", "Routing",
           "default_ledger"]

log = logging.getLogger(__name__)


def pin_message(version: str | None, *, rollback_from: str | None = None) -> dict[str, Any]:
    """The update-topic message that pins ``version`` for every worker (None lifts the pin)."""
    return protocol.pin_message(settings.model_name, version, at=int(time.time() * 1000),
                                rollback_from=rollback_from)


def default_ledger() -> protocol.Ledger:
    """An empty ledger of this worker's model, with the settings' default rollout."""
    return protocol.Ledger(settings.model_name, rollout=protocol.Rollout(
        mode=settings.rollout_mode, share=settings.rollout_canary_share))


@dataclass(frozen=True)
class Routing:
    """What a micro-batch is scored with: the serving model and, during a rollout whose
    candidate this worker loaded, the candidate with its ``mode`` and canary ``share``."""

    model: LoadedModel
    candidate: LoadedModel | None = None
    mode: str | None = None
    share: float = 0.0
    #: Offset of the announcement that started the rollout (a candidate announced again
    #: starts a new one).
    since: int | None = None


@dataclass
class SwapRecord:
    """One model change (or refusal) as shown by ``GET /models/``."""

    version: str
    at: float
    reason: str | None = None
    load_s: float | None = None
    kind: str = "swap"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "at": self.at, "kind": self.kind}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.load_s is not None:
            out["load_s"] = round(self.load_s, 3)
        return out


@dataclass
class ModelLedger:
    """What the manager knows; only the event loop changes it."""

    #: The update topic folded so far, with the versions this worker refused.
    topic: protocol.Ledger = field(default_factory=default_ledger)
    #: What serves now: the base version, or the base with its newest applied update.
    active: LoadedModel | None = None
    #: The base version of :attr:`active`, without updates.
    base: LoadedModel | None = None
    history: deque[SwapRecord] = field(default_factory=lambda: deque(maxlen=50))
    last_swap: SwapRecord | None = None
    last_refusal: SwapRecord | None = None
    refusals: int = 0
    updates_applied: int = 0
    #: The rollout's candidate as loaded and verified here, with the rollout it belongs to.
    candidate: LoadedModel | None = None
    rollout: Candidate | None = None

    @property
    def announced(self) -> Mapping[str, ModelRef]:
        """Every announced version of this model, oldest announcement first."""
        return self.topic.announced

    @property
    def refused(self) -> Mapping[str, str]:
        """Versions that failed to load or verify, with the reason."""
        return self.topic.refused

    @property
    def updates(self) -> Mapping[str, ModelUpdate]:
        """The newest valid update per base version (applied or kept for later)."""
        return self.topic.updates

    @property
    def pinned(self) -> str | None:
        """The pinned version, None when nothing is pinned."""
        return self.topic.pinned

    @property
    def updates_dropped(self) -> int:
        """Stale updates dropped."""
        return self.topic.stale


class ModelManager(Service):
    """Per-worker follower of the update topic that owns the active model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ledger = ModelLedger()
        # A manifest names code to run when its network is a user's factory: only the
        # factories MODEL_FACTORIES lists are called; another is refused when loading.
        self.registry = Registry(settings.registry_uri, settings.storage_options,
                                 factories=settings.model_factories)
        self._ready = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        #: Offset of the next update message to handle; waiters watch it grow.
        self.position = 0
        self._moved = asyncio.Condition()

    @property
    def active(self) -> LoadedModel | None:
        """The model serving now, or None before the first one is loaded."""
        return self.ledger.active

    @property
    def base(self) -> LoadedModel | None:
        """The base version serving now, without incremental updates."""
        return self.ledger.base

    def latest_update(self, base_version: str) -> ModelUpdate | None:
        """The newest valid update seen for ``base_version``."""
        return self.ledger.updates.get(base_version)

    def routing(self) -> Routing:
        """The models a micro-batch is scored with now (one consistent snapshot)."""
        active = self.ledger.active
        assert active is not None
        rollout, candidate = self.ledger.rollout, self.ledger.candidate
        if rollout is None or candidate is None:
            return Routing(active)
        return Routing(active, candidate, rollout.mode, rollout.share, rollout.since)

    async def wait_ready(self) -> LoadedModel:
        """Wait until a model is active and return it."""
        await self._ready.wait()
        assert self.ledger.active is not None
        return self.ledger.active

    async def end_offset(self) -> int:
        """The update topic's end offset now: the offset of the next message published."""
        if self._consumer is None:
            raise ModelError("the update topic's reader has not started")
        tp = TopicPartition(settings.updates_topic, 0)
        end: int = (await self._consumer.end_offsets([tp]))[tp]
        return end

    async def wait_for_offset(self, offset: int, timeout: float) -> bool:
        """Wait until the update message at ``offset`` has been handled; False on timeout."""
        async def reached() -> None:
            async with self._moved:
                await self._moved.wait_for(lambda: self.position > offset)
        try:
            await asyncio.wait_for(reached(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def rollback_target(self) -> str | None:
        """The version a rollback goes to: the newest one announced before the serving base
        that loads, verifies and is compatible; None when there is none."""
        base = self.ledger.base
        if base is None or base.version not in self.ledger.announced:
            return None
        versions = list(self.ledger.announced)
        loop = asyncio.get_running_loop()
        for version in reversed(versions[:versions.index(base.version)]):
            if version in self.ledger.refused:
                continue
            ref = self.ledger.announced[version]
            try:
                model = await loop.run_in_executor(None, self.registry.load_ref, ref)
            except Exception as exc:  # noqa: BLE001 - any failure rules the version out
                log.warning("rollback cannot use %s: %s", version, exc)
                continue
            if _incompatibility(base, model) is None:
                return version
        return None

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
        # Replay the history without loading anything, then load what it says should serve.
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                self._record(record.value, record.offset)
        await self._converge()
        await self._advance(end)
        if self.ledger.active is None:
            log.info("no model announced yet on %s; /ready answers 503 until one is",
                     settings.updates_topic)
        while not self.should_stop:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                if self._record(record.value, record.offset):
                    await self._converge()
                await self._advance(record.offset + 1)

    async def _advance(self, position: int) -> None:
        async with self._moved:
            self.position = max(self.position, position)
            self._moved.notify_all()

    # -- the update topic's messages -------------------------------------------------------

    def _record(self, raw: bytes | None, offset: int) -> bool:
        """Fold one update message into the ledger; True if what should serve may change."""
        ledger, note = protocol.step(self.ledger.topic, Record(offset, raw))
        self.ledger.topic = ledger
        where = f"at {settings.updates_topic} offset {offset}"
        if note.kind == "unknown":
            self._refuse(note.version or "?", f"{note.reason} {where}", kind="ignored")
        elif note.kind == "malformed":
            what = {protocol.MODEL_REF: ("bad announcement", "model"),
                    protocol.PIN: ("bad pin", "model"),
                    protocol.UP: ("bad update", "update")}.get(note.message_type or "",
                                                               ("bad message", "model"))
            self._refuse(note.version or "?", f"{what[0]}: {note.reason} ({where})",
                         kind=what[1])
        elif note.kind == "stale":
            log.info("dropped stale update %s (%s)", note.version, note.reason)
        elif note.kind == "pinned":
            pin = note.message
            log.warning("version %s pinned by an operator%s", note.version,
                        " (rollback)" if getattr(pin, "rollback_from", None) else "")
            self._check_pin()
        elif note.kind == "announced" and note.version == ledger.pinned:
            self._check_pin()
        elif note.kind == "candidate":
            current = ledger.candidate
            log.warning("version %s announced in %s rollout%s", note.version,
                        current.mode if current else "?",
                        f" (canary share {current.share:g})" if current and
                        current.mode == protocol.CANARY else "")
        elif note.kind in ("promoted", "aborted"):
            decision = note.message
            log.warning("candidate %s %s by %s: %s", note.version, note.kind,
                        getattr(decision, "by", "?"), getattr(decision, "reason", ""))
        elif note.kind == "stale-decision":
            log.info("ignored %s of %s: %s", note.message_type, note.version, note.reason)
        return note.changed

    def _check_pin(self) -> None:
        """Report a pin that cannot be honoured (what should serve then skips it)."""
        pinned = self.ledger.pinned
        if pinned is None:
            return
        if pinned not in self.ledger.announced:
            self._refuse(pinned, "pinned version was never announced for "
                         f"{settings.model_name}", kind="pin")
        elif pinned in self.ledger.refused:
            self._refuse(pinned, f"pinned version was refused: {self.ledger.refused[pinned]}",
                         kind="pin")

    def should_serve(self) -> str | None:
        """The version that should serve now, by the ledger (see
        :func:`transport.protocol.should_serve`)."""
        return protocol.should_serve(self.ledger.topic)

    async def _converge(self) -> None:
        """Make :attr:`active` what the ledger says should serve. A version that fails to load
        or verify is refused, and the next one the ledger names is tried, until one loads (often
        the one serving already) or none is left; so a worker serves the same whether it
        followed the topic live or replayed it at start."""
        while True:
            version = self.should_serve()
            if version is None or await self._serve_base(version):
                break
        await self._apply_update()
        await self._load_candidate()

    async def _load_candidate(self) -> None:
        """Load the rollout's candidate (verified, and compatible with the serving base), or
        drop it when the rollout ended; a candidate that fails is refused, and serving goes
        on with the serving version alone."""
        while True:
            rollout = protocol.candidate(self.ledger.topic)
            loaded = self.ledger.candidate
            if rollout is None or self.ledger.base is None:
                if loaded is not None:
                    log.info("rollout of %s ended", loaded.version)
                self.ledger.candidate, self.ledger.rollout = None, None
                return
            if loaded is not None and loaded.version == rollout.version:
                self.ledger.rollout = rollout
                return
            ref = self.ledger.announced[rollout.version]
            try:
                model = await asyncio.get_running_loop().run_in_executor(
                    None, self.registry.load_ref, ref)
            except Exception as exc:  # as for a version to serve: refuse it
                self._refuse(rollout.version, protocol.describe_error(exc), remember=True)
                continue
            incompatible = _incompatibility(self.ledger.base, model)
            if incompatible:
                self._refuse(rollout.version, incompatible, remember=True)
                continue
            self.ledger.candidate, self.ledger.rollout = model, rollout
            record = SwapRecord(model.version, time.time(), kind=f"candidate {rollout.mode}")
            self.ledger.history.append(record)
            log.info("candidate %s loaded for a %s rollout", model.version, rollout.mode)
            return

    async def _serve_base(self, version: str) -> bool:
        """Switch the base to ``version`` (loaded and verified off the event loop); False, with
        the version refused, when it cannot serve."""
        current = self.ledger.base
        if current is not None and current.version == version:
            return True
        ref = self.ledger.announced[version]
        started = time.monotonic()
        promoted = self.ledger.candidate
        if promoted is not None and promoted.version == version:
            model = promoted  # a promoted candidate: loaded and verified already
        else:
            try:
                # load_ref: the manifest must be the version the announcement names.
                model = await asyncio.get_running_loop().run_in_executor(
                    None, self.registry.load_ref, ref)
            except Exception as exc:  # ModelError, S3 unreachable...: refuse, keep serving
                self._refuse(version, protocol.describe_error(exc), remember=True)
                return False
        incompatible = _incompatibility(current, model)
        if incompatible:
            self._refuse(version, incompatible, remember=True)
            return False
        self.ledger.base = model
        self._switch(model, time.monotonic() - started)
        return True

    async def _apply_update(self) -> None:
        """Apply the newest update of the serving base if it is newer than what serves."""
        base, active = self.ledger.base, self.ledger.active
        if base is None or active is None:
            return
        update = self.ledger.updates.get(base.version)
        serving_seq = active.update_seq if active.base_version == base.version else 0
        if update is None or update.seq <= serving_seq:
            return
        from models.online import apply_update

        started = time.monotonic()
        try:
            model = await asyncio.get_running_loop().run_in_executor(
                None, apply_update, base, update)
        except ModelError as exc:
            self._refuse(f"{base.version}+{update.seq}", f"bad update: {exc}", kind="update")
            return
        self.ledger.updates_applied += 1
        self._switch(model, time.monotonic() - started, kind="update")

    def _switch(self, model: LoadedModel, load_s: float, kind: str = "swap") -> None:
        record = SwapRecord(model.version, time.time(), load_s=load_s, kind=kind)
        self.ledger.active = model  # the serving path picks it up at its next micro-batch
        self.ledger.last_swap = record
        self.ledger.history.append(record)
        self._ready.set()
        record_model_state(model.version, self.ledger.refusals)
        log.info("serving model %s version %s (%s in %.3fs)", model.name, model.version, kind,
                 load_s)

    def _refuse(self, version: str, reason: str, kind: str = "model",
                remember: bool = False) -> None:
        if remember:
            self.ledger.topic = protocol.refuse(self.ledger.topic, version, reason)
        record = SwapRecord(version, time.time(), reason=reason, kind=f"refused {kind}")
        self.ledger.last_refusal = record
        self.ledger.refusals += 1
        self.ledger.history.append(record)
        MODEL_REFUSAL_REASONS.labels(kind).inc()
        record_model_state(self.active.version if self.active else None, self.ledger.refusals)
        log.error("refused %s %s: %s", kind, version, reason)

    def describe(self) -> dict[str, Any]:
        """The JSON body of ``GET /models/``."""
        ledger = self.ledger
        active = ledger.active
        return {
            "model": settings.model_name,
            "active": active.version if active else None,
            "base_version": ledger.base.version if ledger.base else None,
            "update_seq": active.update_seq if active else None,
            "pinned": ledger.pinned,
            "task": active.task if active else None,
            "features": list(active.features) if active else None,
            "classes": list(active.classes) if active else None,
            "metrics": active.metrics if active else None,
            "announced": list(ledger.announced),
            "refused": dict(ledger.refused),
            "last_swap": ledger.last_swap.as_dict() if ledger.last_swap else None,
            "last_refusal": ledger.last_refusal.as_dict() if ledger.last_refusal else None,
            "refusals": ledger.refusals,
            "updates_applied": ledger.updates_applied,
            "updates_dropped": ledger.updates_dropped,
            "history": [r.as_dict() for r in ledger.history],
            "rollout": self.describe_rollout(),
        }

    def describe_rollout(self) -> dict[str, Any] | None:
        """The rollout in ``GET /models/``: the candidate, its mode, canary share, the offset
        of its announcement (``since``), whether this worker loaded it, and the last decision;
        None when there never was one."""
        topic = self.ledger.topic
        current = topic.candidate
        last = topic.decisions[-1].to_message() if topic.decisions else None
        if current is None and last is None:
            return None
        out: dict[str, Any] = current.as_dict() if current is not None else {
            "candidate": None, "mode": None, "share": None, "since": None}
        out["loaded"] = (self.ledger.candidate is not None and current is not None
                         and self.ledger.candidate.version == current.version)
        if last is not None:
            out["decision"] = last
        return out


def _incompatibility(current: LoadedModel | None, new: LoadedModel) -> str | None:
    """Why ``new`` cannot replace ``current`` under live traffic, or None: another task (the
    predictions, labels and quality figures would change meaning mid-stream), another set of
    features, or other classes."""
    if current is None:
        return None
    if new.task != current.task:
        return (f"incompatible task: {new.task} instead of {current.task} (a model of "
                "another task needs a new MODEL_NAME)")
    if set(new.features) != set(current.features):
        missing = sorted(set(current.features) - set(new.features))
        extra = sorted(set(new.features) - set(current.features))
        return f"incompatible features: missing {missing[:5]}, unexpected {extra[:5]}"
    if list(new.classes) != list(current.classes):
        return f"incompatible classes: {list(new.classes)} instead of {list(current.classes)}"
    return None


model_manager = ModelManager()
app.service(model_manager)  # type: ignore[arg-type]  # Faust takes a Service instance too

"""The speed layer: live model quality and incremental updates from labelled events.

The serving agent forwards the labelled events it scored (one message per micro-batch) to
an internal topic with ONE partition, together with the version that predicted them and the
probabilities it predicted (prequential evaluation: each example is predicted before anything
learns from it). One agent of the group reads that topic, so exactly one worker learns and
numbers the chain of updates. It

* keeps the ``quality_by_version`` table: per model version, the labelled events it predicted,
  their accuracy and log loss overall and as a rolling (exponentially weighted) figure;
* when ``SPEED_LAYER=1``, buffers the examples of the serving base version and, every
  ``SPEED_WINDOW_S`` with at least ``SPEED_MIN_EXAMPLES`` new ones, refits the output layer in a
  thread (:class:`models.online.OutputLayerLearner`) and publishes the result as an ``UP``
  message on the update topic, numbered after the newest update of that base. Every worker's
  model manager applies it; a new base version from the batch layer starts a new chain.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import orjson
from faust.types import EventT

from agents.model_manager import model_manager
from agents.scoring import SourceMessage
from app import app
from app.schemas import ValidEvent
from models.online import ModelUpdate, OutputLayerLearner, apply_update
from models.serving import LoadedModel

settings = app.settings

__all__ = ["LABELLED_TOPIC", "labelled_topic", "quality_by_version", "labelled_messages",
           "parse_labelled", "LabelledExample", "update_quality", "record_quality",
           "learn_from_labels", "SpeedLayer", "speed_layer"]

log = logging.getLogger(__name__)

#: The internal topic of labelled, already-predicted events.
LABELLED_TOPIC = f"{settings.app_id}-labelled"
#: Most labelled events forwarded in one message (about 200 KB of JSON with 30 features).
LABELLED_PER_MESSAGE = 512
#: Messages the agent takes at once, and the longest it waits to fill a batch.
LABELLED_BATCH = 64
LABELLED_WITHIN_S = 0.2
#: Half-life, in labelled events, of the rolling figures of ``quality_by_version``.
QUALITY_HALF_LIFE = 200
#: Most versions ``quality_by_version`` keeps (the least recently scored go first): with an
#: update every few seconds, versions are many.
QUALITY_MAX_VERSIONS = 500
# Probabilities are clipped to this before the log, as scikit-learn's log_loss does.
_EPS = 1e-15

labelled_topic = app.topic(LABELLED_TOPIC, internal=True, partitions=1, key_type=bytes,
                           value_type=bytes, key_serializer="raw", value_serializer="raw")

quality_by_version = app.Table(
    "quality_by_version", key_type=str, partitions=1,
    help="Prequential quality per model version on labelled events: n, accuracy, log loss, "
         f"and rolling figures (half-life {QUALITY_HALF_LIFE} events).")


# -- serving side: what is forwarded ---------------------------------------------------------

def labelled_messages(model: Any, valid: Sequence[tuple[SourceMessage, ValidEvent]],
                      probabilities: np.ndarray) -> list[bytes]:
    """The messages that forward the labelled events of a scored micro-batch.

    One message carries up to :data:`LABELLED_PER_MESSAGE` events: a message per event would
    cost the serving hot path a send, and the learning agent an event, for each of them.

    Parameters
    ----------
    model
        The model that scored the batch (``version``, ``classes``, optionally
        ``base_version``).
    valid
        The batch's valid events, as :func:`agents.scoring.triage` returns them.
    probabilities
        ``(len(valid), n_classes)`` predicted probabilities, row ``i`` for ``valid[i]``.

    Returns
    -------
    list of bytes
        Compact JSON, none when no event is labelled: ``version`` and ``base_version`` of the
        model that predicted the events, and per event (same order in every list) ``ids``,
        ``labels`` (class indexes), ``features`` (raw rows in the model's feature order,
        ``null`` where missing), ``probabilities`` and ``ts``.
    """
    labelled = [i for i, (_, event) in enumerate(valid) if event.label is not None]
    if not labelled:
        return []
    # Validation matched every label to a class: strings to strings, ints to ints.
    index = {c: k for k, c in enumerate(model.classes)}
    base_version = getattr(model, "base_version", model.version)
    out = []
    for start in range(0, len(labelled), LABELLED_PER_MESSAGE):
        chunk = labelled[start:start + LABELLED_PER_MESSAGE]
        events = [valid[i][1] for i in chunk]
        out.append(orjson.dumps(
            {"version": model.version, "base_version": base_version,
             "ids": [e.id for e in events], "labels": [index[e.label] for e in events],
             "features": np.stack([e.features for e in events]),
             "probabilities": probabilities[chunk], "ts": [e.ts for e in events]},
            option=orjson.OPT_SERIALIZE_NUMPY))
    return out


# -- learning side: pure logic ---------------------------------------------------------------

class LabelledExample:
    """One forwarded labelled event, decoded: who predicted it, its label and features, and
    the probabilities predicted."""

    __slots__ = ("version", "base_version", "label", "features", "probabilities")

    def __init__(self, version: str, base_version: str, label: int, features: list[Any],
                 probabilities: list[float]) -> None:
        self.version = version
        self.base_version = base_version
        self.label = label
        self.features = features
        self.probabilities = probabilities

    @property
    def correct(self) -> bool:
        """Whether the most probable class was the label."""
        p = self.probabilities
        return max(range(len(p)), key=p.__getitem__) == self.label

    @property
    def log_loss(self) -> float:
        """``-log p(label)``, with ``p`` clipped to ``[1e-15, 1]``."""
        return -math.log(min(max(float(self.probabilities[self.label]), _EPS), 1.0))


def parse_labelled(raw: bytes | None) -> list[LabelledExample]:
    """Decode one message of :func:`labelled_messages`; raise ``ValueError`` when malformed."""
    try:
        m = orjson.loads(raw or b"")
        version, base_version = m["version"], m["base_version"]
        labels, features, probabilities = m["labels"], m["features"], m["probabilities"]
    except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
        raise ValueError(f"not a labelled-event message: {exc}") from None
    if not (isinstance(version, str) and isinstance(base_version, str)
            and isinstance(labels, list) and isinstance(features, list)
            and isinstance(probabilities, list)
            and len(labels) == len(features) == len(probabilities)):
        raise ValueError("not a labelled-event message: bad field types or lengths")
    examples = []
    for label, row, p in zip(labels, features, probabilities):
        if not (isinstance(label, int) and isinstance(row, list) and isinstance(p, list)
                and 0 <= label < len(p)):
            raise ValueError("not a labelled-event message: bad label, features or "
                             "probabilities")
        examples.append(LabelledExample(version, base_version, label, row, p))
    return examples


def update_quality(row: dict[str, Any] | None, examples: Sequence[LabelledExample],
                   now_ms: int) -> dict[str, Any]:
    """A version's ``quality_by_version`` row after ``examples`` (all predicted by it).

    ``accuracy`` and ``log_loss`` cover every labelled event the version predicted;
    ``rolling_accuracy`` and ``rolling_log_loss`` are exponentially weighted averages whose
    weights halve every :data:`QUALITY_HALF_LIFE` events back.
    """
    row = dict(row) if row else {"n": 0, "correct": 0, "log_loss_sum": 0.0,
                                 "rolling_accuracy": None, "rolling_log_loss": None,
                                 "first_ms": now_ms}
    alpha = 1 - 0.5 ** (1 / QUALITY_HALF_LIFE)
    n, correct, loss_sum = row["n"], row["correct"], row["log_loss_sum"]
    r_acc, r_loss = row["rolling_accuracy"], row["rolling_log_loss"]
    for example in examples:
        hit, loss = float(example.correct), example.log_loss
        n += 1
        correct += int(hit)
        loss_sum += loss
        # Until QUALITY_HALF_LIFE events were seen, the plain mean is the better estimate.
        a = max(alpha, 1 / n)
        r_acc = hit if r_acc is None else r_acc + a * (hit - r_acc)
        r_loss = loss if r_loss is None else r_loss + a * (loss - r_loss)
    row.update({"n": n, "correct": correct, "log_loss_sum": loss_sum,
                "accuracy": correct / n if n else None,
                "log_loss": loss_sum / n if n else None,
                "rolling_accuracy": r_acc, "rolling_log_loss": r_loss, "last_ms": now_ms})
    return row


def record_quality(examples: Sequence[LabelledExample], partition: int, now_ms: int) -> None:
    """Fold ``examples`` into ``quality_by_version`` (store and changelog), one write per
    version, and drop the least recently scored versions beyond
    :data:`QUALITY_MAX_VERSIONS`."""
    by_version: dict[str, list[LabelledExample]] = {}
    for example in examples:
        by_version.setdefault(example.version, []).append(example)
    store = quality_by_version.data
    for version, mine in by_version.items():
        row = update_quality(store.get(version), mine, now_ms)
        # Re-inserted last, so the store's order stays least recently scored first.
        store.pop(version, None)
        store[version] = row
        quality_by_version.send_changelog(partition, version, row)
    excess = len(store) - QUALITY_MAX_VERSIONS
    if excess > 0:
        for version in list(store.keys())[:excess]:
            del store[version]
            quality_by_version.send_changelog(partition, version, None, value_serializer="raw")


# -- learning side: state and wiring ---------------------------------------------------------

def _init_learning_thread() -> None:
    import torch

    torch.set_num_threads(settings.torch_threads)


# One thread: refits run one after another, never on the event loop.
learning_executor = ThreadPoolExecutor(1, thread_name_prefix="speed",
                                       initializer=_init_learning_thread)


class SpeedLayer:
    """This worker's learner: examples of the serving base since the last update, and the
    chain of updates it published.

    Only the event loop touches the attributes; the learner itself is used by the learning
    thread only.
    """

    def __init__(self) -> None:
        self.learner: OutputLayerLearner | None = None
        self.pending_base: str | None = None
        self.pending_X: list[list[Any]] = []
        self.pending_y: list[int] = []
        self.published: ModelUpdate | None = None
        self.updates_published = 0

    def collect(self, examples: Sequence[LabelledExample], base: LoadedModel | None) -> int:
        """Keep the examples predicted by ``base`` (or an update of it); return how many."""
        if base is None:
            return 0
        if self.pending_base != base.base_version:
            self.pending_base = base.base_version
            self.pending_X, self.pending_y = [], []
        n_features = base.n_features
        kept = 0
        for example in examples:
            if example.base_version == base.base_version and len(
                    example.features) == n_features:
                self.pending_X.append(example.features)
                self.pending_y.append(example.label)
                kept += 1
        # Bound the memory while a refit is slow: older ones would be dropped anyway.
        if len(self.pending_y) > 2 * settings.speed_buffer:
            del self.pending_X[:-settings.speed_buffer], self.pending_y[:-settings.speed_buffer]
        return kept

    def next_seq(self, base: LoadedModel) -> tuple[ModelUpdate | None, int]:
        """The newest update of ``base``'s chain (this worker's or any applied one), and the
        sequence number of the next."""
        newest = model_manager.latest_update(base.base_version)
        mine = self.published
        if mine is not None and mine.base_version == base.base_version and (
                newest is None or mine.seq > newest.seq):
            newest = mine
        return newest, (newest.seq + 1 if newest is not None else 1)

    async def step(self) -> ModelUpdate | None:
        """Refit and publish once if the base has enough new examples; the update or None."""
        base = model_manager.base
        if base is None or self.pending_base != base.base_version:
            return None
        if len(self.pending_y) < settings.speed_min_examples:
            return None
        if self.learner is None or self.learner.base.base_version != base.base_version:
            self.learner = OutputLayerLearner(base, capacity=settings.speed_buffer,
                                              half_life=settings.speed_half_life)
        # Only the newest SPEED_BUFFER can stay in the buffer: the hidden layers never see
        # the others, which matters when labels arrive faster than the buffer turns over.
        keep = settings.speed_buffer
        X = np.array(self.pending_X[-keep:], dtype=np.float64)  # null features become NaN
        y = np.array(self.pending_y[-keep:], dtype=np.int64)
        new = len(self.pending_y)
        self.pending_X, self.pending_y = [], []
        newest, seq = self.next_seq(base)
        started = time.monotonic()
        update = await asyncio.get_running_loop().run_in_executor(
            learning_executor, _learn, self.learner, base, newest, X, y, seq)
        fit_s = time.monotonic() - started
        await app.producer.send_and_wait(
            settings.updates_topic, update.model.encode(), orjson.dumps(update.to_message()),
            partition=0, timestamp=None, headers=None)
        self.published = update
        self.updates_published += 1
        fit = update.extra["fit"]
        log.info("published update %s from %d examples (%d new) in %.2fs: weighted accuracy "
                 "%.3f -> %.3f", update.version, update.n_examples, new, fit_s,
                 fit["accuracy_before"], fit["accuracy_after"])
        return update


def _learn(learner: OutputLayerLearner, base: LoadedModel, newest: ModelUpdate | None,
           X: np.ndarray, y: np.ndarray, seq: int) -> ModelUpdate:
    """Runs in the learning thread: add the examples, refit from the chain's head."""
    learner.add(X, y)
    head = apply_update(base, newest) if newest is not None else base
    return learner.fit(head, seq)


speed_layer = SpeedLayer()


@app.agent(labelled_topic, concurrency=1)
async def learn_from_labels(stream: Any) -> None:
    """Measure each version's quality on labelled events and collect them for learning."""
    async for events in stream.noack_take(LABELLED_BATCH, within=LABELLED_WITHIN_S):
        examples = _decode(events)
        if examples:
            record_quality(examples, events[0].message.partition, int(time.time() * 1000))
            if settings.speed_layer:
                speed_layer.collect(examples, model_manager.base)
        for event in events:
            await stream.ack(event)


def _decode(events: list[EventT]) -> list[LabelledExample]:
    examples: list[LabelledExample] = []
    for event in events:
        try:
            examples.extend(parse_labelled(event.value))
        except ValueError as exc:
            message = event.message
            log.error("skipped %s[%s]@%s: %s", message.topic, message.partition,
                      message.offset, exc)
    return examples


async def publish_update() -> None:
    """Every ``SPEED_WINDOW_S``: refit and publish if there is enough to learn from."""
    try:
        await speed_layer.step()
    except Exception:  # a failed fit or send must not stop the timer; the next window retries
        log.exception("speed-layer update failed")


if settings.speed_layer:
    app.timer(settings.speed_window_s, name="speed_layer_updates")(publish_update)

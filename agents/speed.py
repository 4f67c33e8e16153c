"""The speed layer: live model quality and incremental updates from labelled events.

The serving path summarises every micro-batch it scored in one message on an internal topic
with ONE partition: the events predicted per class, and the labelled events with the version
that predicted them and the probabilities it predicted (prequential evaluation: each example
is predicted before anything learns from it). One agent of the group reads that topic, so
exactly one worker keeps the counts, learns and numbers the chain of updates. It

* adds the counts to ``class_counts`` and ``scored_by_version``;
* keeps the ``quality_by_version`` table: per model version, the labelled events it predicted,
  their accuracy and log loss overall and as a rolling (exponentially weighted) figure;
* when ``SPEED_LAYER=1``, buffers the examples of the serving base version and, every
  ``SPEED_WINDOW_S`` with at least ``SPEED_MIN_EXAMPLES`` new ones, refits the output layer in a
  process of its own (:func:`models.online.refit`, so that a refit never holds the serving
  process's GIL) and publishes the result as an ``UP``
  message on the update topic, numbered after the newest update of that base. Every worker's
  model manager applies it; a new base version from the batch layer starts a new chain.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import orjson

from agents.lease import worker_lease
from agents.model_manager import model_manager
from agents.tables import SUMMARY_CHANGELOG_CONFIG, count_scored
from app import app
from app.topics import durability_config
from models.errors import ModelError
from models.metrics import log_loss
from models.online import BaseNotHeld, ModelUpdate, refit, start_learning_process
from models.serving import LoadedModel

settings = app.settings

__all__ = ["SCORED_TOPIC", "scored_topic", "quality_by_version", "summary_messages",
           "parse_summary", "ScoredSummary", "LabelledBatch", "update_quality",
           "record_quality", "summarize_scored", "SpeedLayer", "speed_layer"]

log = logging.getLogger(__name__)

#: The internal topic where serving summarises each micro-batch it scored.
SCORED_TOPIC = f"{settings.app_id}-scored"
#: Most labelled events forwarded in one message (about 170 KB of JSON with 30 features).
LABELLED_PER_MESSAGE = 512
#: Half-life, in labelled events, of the rolling figures of ``quality_by_version``.
QUALITY_HALF_LIFE = 200
#: Most versions ``quality_by_version`` keeps (the least recently scored go first): with an
#: update every few seconds, versions are many.
QUALITY_MAX_VERSIONS = 500
scored_topic = app.topic(SCORED_TOPIC, internal=True, partitions=1, key_type=bytes,
                         value_type=bytes, key_serializer="raw", value_serializer="raw",
                         config=durability_config(settings))

quality_by_version = app.Table(
    "quality_by_version", key_type=str, partitions=1,
    extra_topic_configs=SUMMARY_CHANGELOG_CONFIG,
    help="Prequential quality per model version on labelled events: n, accuracy, log loss, "
         f"and rolling figures (half-life {QUALITY_HALF_LIFE} events).")


# -- serving side: what is forwarded ---------------------------------------------------------

def summary_messages(model: Any, predicted: Sequence[Any], ids: Sequence[str],
                     labels: Sequence[Any], features: np.ndarray, probabilities: np.ndarray,
                     ts: Sequence[int | None]) -> list[bytes]:
    """What serving tells the rest of the worker group about a scored micro-batch: how many
    events each class was predicted for, and the labelled events with what was predicted.

    One message per micro-batch (more only past :data:`LABELLED_PER_MESSAGE` labelled events),
    on a one-partition topic, so that one worker of the group keeps the counts and the quality
    per version and learns from the labels. The arrays travel as little-endian bytes in
    base64: neither side formats or parses a number per feature.

    Parameters
    ----------
    model
        The model that scored the batch (``version``, ``classes``, optionally
        ``base_version``).
    predicted
        The class predicted for each event.
    ids, labels, features, probabilities, ts
        The batch's scored events as columns, row ``i`` of each for the same event: ``labels``
        holds None for an unlabelled event, ``features`` the raw ``(n, n_features)`` rows in
        the model's order and ``probabilities`` the ``(n, n_classes)`` prediction.

    Returns
    -------
    list of bytes
        Compact JSON: ``version`` and ``base_version`` of the model that scored the batch,
        ``scored`` (events) and ``classes`` (class -> events predicted; in the first message
        only); per labelled event (same order throughout) ``ids``, ``ts`` and ``labels``
        (class indexes); ``n_features``, and ``features`` (float64, NaN where missing) and
        ``probabilities`` (float32) as base64 of row-major little-endian arrays.
    """
    # Validation matched every label to a class: strings to strings, ints to ints.
    index = {c: k for k, c in enumerate(model.classes)}
    base_version = getattr(model, "base_version", model.version)
    labelled = [i for i, label in enumerate(labels) if label is not None]
    counts = Counter(map(str, predicted))
    out = []
    for start in range(0, max(len(labelled), 1), LABELLED_PER_MESSAGE):
        chunk = labelled[start:start + LABELLED_PER_MESSAGE]
        first = start == 0
        out.append(orjson.dumps({
            "version": model.version, "base_version": base_version,
            "scored": len(predicted) if first else 0, "classes": counts if first else {},
            "ids": [ids[i] for i in chunk], "ts": [ts[i] for i in chunk],
            "labels": [index[labels[i]] for i in chunk],
            "n_features": int(features.shape[1]),
            "features": _b64(features[chunk], "<f8"),
            "probabilities": _b64(probabilities[chunk], "<f4")}))
    return out


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


# -- learning side: pure logic ---------------------------------------------------------------

@dataclass(frozen=True)
class LabelledBatch:
    """Labelled events one model version predicted, decoded from one forwarded message."""

    version: str
    base_version: str
    #: Class index of each event's label.
    labels: np.ndarray
    #: ``(n, n_features)`` raw features in the model's order, NaN where missing.
    features: np.ndarray
    #: ``(n, n_classes)`` probabilities the version predicted.
    probabilities: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        """Whether the most probable class was the label, per event."""
        return self.probabilities.argmax(axis=1) == self.labels

    def log_loss_sum(self, weights: np.ndarray | None = None) -> float:
        """Sum of the events' log losses (weighted by ``weights``), as
        :func:`models.metrics.log_loss` computes them: the batch layer's test log loss is the
        mean of the same figure."""
        return log_loss(self.labels, self.probabilities, sample_weight=weights, normalize=False)


@dataclass(frozen=True)
class ScoredSummary:
    """One micro-batch as :func:`summary_messages` summarised it."""

    version: str
    scored: int
    #: Events predicted per class (class as a string).
    classes: dict[str, int]
    #: Its labelled events, or None when it had none.
    labelled: LabelledBatch | None


def parse_summary(raw: bytes | None) -> ScoredSummary:
    """Decode one message of :func:`summary_messages`; raise ``ValueError`` when malformed."""
    try:
        m = orjson.loads(raw or b"")
        version, base_version = m["version"], m["base_version"]
        scored, classes = m["scored"], m["classes"]
        labels, n_features = m["labels"], m["n_features"]
        features = base64.b64decode(m["features"], validate=True)
        probabilities = base64.b64decode(m["probabilities"], validate=True)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"not a summary of scored events: {exc}") from None
    if not (isinstance(version, str) and isinstance(base_version, str)
            and type(scored) is int and scored >= 0 and isinstance(classes, dict)
            and all(type(n) is int and n >= 0 for n in classes.values())
            and isinstance(labels, list) and all(type(label) is int for label in labels)
            and type(n_features) is int and n_features >= 1):
        raise ValueError("not a summary of scored events: bad field types")
    if not labels:
        return ScoredSummary(version, scored, classes, None)
    n = len(labels)
    if len(features) != 8 * n * n_features or len(probabilities) % (4 * n):
        raise ValueError("not a summary of scored events: array sizes do not match the "
                         "labels")
    X = np.frombuffer(features, dtype="<f8").reshape(n, n_features)
    P = np.frombuffer(probabilities, dtype="<f4").reshape(n, -1)
    y = np.asarray(labels, dtype=np.int64)
    if P.shape[1] < 2 or y.min() < 0 or y.max() >= P.shape[1]:
        raise ValueError("not a summary of scored events: a label is not a class index")
    return ScoredSummary(version, scored, classes, LabelledBatch(version, base_version, y, X, P))


def update_quality(row: dict[str, Any] | None, batch: LabelledBatch,
                   now_ms: int) -> dict[str, Any]:
    """A version's ``quality_by_version`` row after ``batch`` (all predicted by it).

    ``accuracy`` and ``log_loss`` cover every labelled event the version predicted;
    ``rolling_accuracy`` and ``rolling_log_loss`` are exponentially weighted averages whose
    weights halve every :data:`QUALITY_HALF_LIFE` events back.
    """
    row = dict(row) if row else {"n": 0, "correct": 0, "log_loss_sum": 0.0,
                                 "rolling_accuracy": None, "rolling_log_loss": None,
                                 "first_ms": now_ms}
    hits = batch.correct.astype(np.float64)
    n, m = row["n"], len(hits)
    alpha = 1 - 0.5 ** (1 / QUALITY_HALF_LIFE)
    # Each event moves a rolling figure r by r <- r + a (x - r), with a = 1/n while fewer than
    # 1/alpha events were seen (the plain mean is the better estimate then) and alpha after:
    # r_after = keep * r_before + sum_i w_i x_i, with w_i = a_i * prod_{j > i} (1 - a_j).
    steps = np.maximum(alpha, 1.0 / np.arange(n + 1, n + m + 1, dtype=np.float64))
    after = np.append(np.cumprod((1.0 - steps)[::-1])[::-1], 1.0)  # prod_{j >= i} (1 - a_j)
    weights, keep = steps * after[1:], float(after[0])
    r_acc = keep * (row["rolling_accuracy"] or 0.0) + float(weights @ hits)
    r_loss = keep * (row["rolling_log_loss"] or 0.0) + batch.log_loss_sum(weights)
    n += m
    correct = row["correct"] + int(hits.sum())
    loss_sum = row["log_loss_sum"] + batch.log_loss_sum()
    row.update({"n": n, "correct": correct, "log_loss_sum": loss_sum,
                "accuracy": correct / n if n else None,
                "log_loss": loss_sum / n if n else None,
                "rolling_accuracy": r_acc, "rolling_log_loss": r_loss, "last_ms": now_ms})
    return row


def record_quality(batches: Sequence[LabelledBatch], partition: int, now_ms: int) -> None:
    """Fold ``batches`` into ``quality_by_version`` (store and changelog), one write per
    version, and drop the least recently scored versions beyond
    :data:`QUALITY_MAX_VERSIONS`."""
    store = quality_by_version.data
    rows: dict[str, dict[str, Any]] = {}
    for batch in batches:
        rows[batch.version] = update_quality(rows.get(batch.version, store.get(batch.version)),
                                             batch, now_ms)
    for version, row in rows.items():
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

def _learning_process() -> ProcessPoolExecutor:
    """One spawned process for refits (see :func:`models.online.refit`)."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=start_learning_process,
                               initargs=(settings.torch_threads,))


class SpeedLayer:
    """This worker's learner: examples of the serving base since the last update, and the
    chain of updates it published.

    Only the event loop touches the attributes; the learner itself lives in the learning
    process.
    """

    def start(self) -> None:
        """Start the learning process (its imports take seconds: better at start-up)."""
        if self.process is None:
            self.process = _learning_process()
            self.process.submit(int)

    def __init__(self) -> None:
        self.process: ProcessPoolExecutor | None = None
        #: The base version whose learner the learning process holds.
        self.process_base: str | None = None
        self.pending_base: str | None = None
        #: Examples of the serving base since the last refit, in chunks as they came.
        self.pending_X: list[np.ndarray] = []
        self.pending_y: list[np.ndarray] = []
        self.published: ModelUpdate | None = None
        self.updates_published = 0

    @property
    def pending(self) -> int:
        """Examples waiting for the next refit."""
        return sum(len(y) for y in self.pending_y)

    def collect(self, batches: Sequence[LabelledBatch], base: LoadedModel | None) -> int:
        """Keep the examples predicted by ``base`` (or an update of it); return how many."""
        if base is None:
            return 0
        if self.pending_base != base.base_version:
            self.pending_base = base.base_version
            self.pending_X, self.pending_y = [], []
        kept = 0
        for batch in batches:
            if batch.base_version == base.base_version and \
                    batch.features.shape[1] == base.n_features:
                self.pending_X.append(batch.features)
                self.pending_y.append(batch.labels)
                kept += len(batch)
        # Bound the memory while a refit is slow: older ones would be dropped anyway.
        while len(self.pending_y) > 1 and \
                self.pending - len(self.pending_y[0]) >= settings.speed_buffer:
            del self.pending_X[0], self.pending_y[0]
        return kept

    async def _refit(self, base: LoadedModel, newest: ModelUpdate | None, X: np.ndarray,
                     y: np.ndarray, seq: int) -> ModelUpdate:
        """Refit in the learning process, sending the base model only when it lacks it (and
        starting a new process if the last one died)."""
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            self.start()
            assert self.process is not None
            send = base if self.process_base != base.base_version else None
            try:
                update = await loop.run_in_executor(
                    self.process, refit, send, base.base_version, settings.speed_buffer,
                    settings.speed_half_life, newest, X, y, seq)
            except BaseNotHeld:
                self.process_base = None
            except BrokenProcessPool:
                log.error("the learning process died; starting another")
                self.process, self.process_base = None, None
                if attempt:
                    raise
            else:
                self.process_base = base.base_version
                return update
        raise ModelError("the learning process lost the base model twice in a row")

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
        new = self.pending
        if new < settings.speed_min_examples:
            return None
        # Only the newest SPEED_BUFFER can stay in the buffer: the hidden layers never see
        # the others, which matters when labels arrive faster than the buffer turns over.
        keep = settings.speed_buffer
        X = np.concatenate(self.pending_X)[-keep:]
        y = np.concatenate(self.pending_y)[-keep:]
        self.pending_X, self.pending_y = [], []
        newest, seq = self.next_seq(base)
        started = time.monotonic()
        update = await self._refit(base, newest, X, y, seq)
        fit_s = time.monotonic() - started
        if not worker_lease.held:
            # Perhaps no longer the learner: its successor may be publishing this seq.
            log.warning("update %s not published: this worker's partitions are in doubt after "
                        "a stall", update.version)
            return None
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




speed_layer = SpeedLayer()


@app.agent(scored_topic, concurrency=1)
async def summarize_scored(stream: Any) -> None:
    """Count what serving scored, measure each version's quality on labelled events and
    collect them for learning: one summary per micro-batch of any worker."""
    async for event in stream.events():  # the count tables are written in an event's context
        try:
            summary = parse_summary(event.value)
        except ValueError as exc:
            message = event.message
            log.error("skipped %s[%s]@%s: %s", message.topic, message.partition,
                      message.offset, exc)
            continue
        count_scored(summary.version, summary.scored, summary.classes)
        if summary.labelled is not None:
            record_quality([summary.labelled], event.message.partition,
                           int(time.time() * 1000))
            if settings.speed_layer:
                speed_layer.collect([summary.labelled], model_manager.base)


async def publish_update() -> None:
    """Every ``SPEED_WINDOW_S``: refit and publish if there is enough to learn from."""
    try:
        await speed_layer.step()
    except Exception:  # a failed fit or send must not stop the timer; the next window retries
        log.exception("speed-layer update failed")


if settings.speed_layer:
    app.timer(settings.speed_window_s, name="speed_layer_updates")(publish_update)

    @app.task
    async def start_learner() -> None:
        """Start the learning process (and its imports) while the worker starts."""
        speed_layer.start()

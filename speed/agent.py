"""The speed layer: live model quality and incremental updates from labelled events.

The serving path summarises every micro-batch it scored in one message on an internal topic
with ONE partition: the events predicted per class, and the labelled events with the version
that predicted them and the probabilities it predicted (prequential evaluation: each example
is predicted before anything learns from it). One agent of the group reads that topic, so
exactly one worker keeps the counts, learns and numbers the chain of updates. It

* adds the counts to ``class_counts`` and ``scored_by_version``;
* keeps the ``quality_by_version`` table: per model version, the labelled events it predicted,
  their accuracy and log loss (a regression's: RMSE, MAE and R²) overall and as a rolling
  (exponentially weighted) figure;
* during a rollout (:mod:`transport.rollout`), measures the candidate's and the serving
  version's live quality since the rollout began (a shadow candidate's from the summaries of
  its unserved predictions) and, on the worker that holds the scored partition, publishes
  the policy's ``PROMOTE`` or ``ABORT`` (:class:`RolloutPolicy`);
* when ``SPEED_LAYER`` is on, buffers the examples of the serving base version and, every
  ``SPEED_WINDOW_S`` with at least ``SPEED_MIN_EXAMPLES`` new ones, refits the output layer in a
  process of its own (:func:`models.online.refit`, so that a refit never holds the serving
  process's GIL) and publishes the result as an ``UP``
  message on the update topic, numbered after the newest update of that base. Every worker's
  model manager applies it; a new base version from the batch layer starts a new chain.

One ``(base_version, seq)``, one update
---------------------------------------
The refit timer runs on every worker, but only the worker that holds the scored-summary
partition now (the learner, ``stratum_speed_learner 1``) publishes, and a chain is numbered by
one learner at a time:

* The learner is known from Faust's rebalance signals, as serving and the archive know their
  partitions: ``on_partitions_assigned`` makes a worker the learner when its assignment holds
  the partition; ``on_partitions_revoked`` (and the worker's shutdown) ends that. Each change
  starts a new learner generation.
* Revocation drops the examples buffered for the next refit, and the learning process starts
  a new learner at the next refit of a later generation, so a former learner has nothing left
  to refit (the dropped examples are logged with their count; those whose summaries were not
  committed yet are read again by the next learner, the others are not learnt from: at most
  about one window). A refit under way is not published: ownership and generation are checked
  again after the refit, just before the send. A send under way is awaited by the revocation
  receiver, which Faust awaits before the worker rejoins the group: every update the old
  learner published is stored before the group can hand the partition to another worker.
* A learner publishes for a new generation only once its model manager has handled the update
  topic up to the end offset it read after the assignment (:meth:`SpeedLayer.catch_up`). The
  old learner's updates are all below that offset, so the next ``seq`` is one above the newest
  of the chain: a learner taking over after another published ``N`` continues at ``N + 1``
  even if its model manager had not read ``N`` yet when the partition moved.
* A worker frozen past the session timeout is dropped from the group without running its
  receivers; the worker's lease (:mod:`transport.lease`) keeps it from publishing when it wakes,
  until the group confirms its partitions, and the rebalance that follows revokes the
  partition as above.
"""
from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Sequence

import numpy as np
import orjson

from transport import protocol
from transport.lease import worker_lease
from transport.rollout import Tracker, Verdict, decide
from serving.model_manager import model_manager
from serving.tables import SUMMARY_CHANGELOG_CONFIG, count_scored
from app import app
from transport.schemas import CLASSIFICATION, REGRESSION
from transport.summary import LabelledBatch, parse_summary
from transport.topics import scored_topic_name, scored_topic_spec
from models.errors import ModelError
from models.metrics import log_loss
from models.online import BaseNotHeld, ModelUpdate, refit, start_learning_process
from models.loaded import LoadedModel

settings = app.settings

__all__ = ["SCORED_TOPIC", "scored_topic", "quality_by_version", "update_quality",
           "update_regression_quality", "log_loss_sum", "record_quality", "summarize_scored",
           "SpeedLayer", "speed_layer", "RolloutPolicy", "rollout_policy", "batch_losses",
           "rollout_figures", "ROLLOUT_KEY"]

log = logging.getLogger(__name__)

#: The internal topic where serving summarises each micro-batch it scored.
SCORED_TOPIC = scored_topic_name(settings)
#: Half-life, in labelled events, of the rolling figures of ``quality_by_version``.
QUALITY_HALF_LIFE = 200
#: Most versions ``quality_by_version`` keeps (the least recently scored go first): with an
#: update every few seconds, versions are many.
QUALITY_MAX_VERSIONS = 500

_SCORED = scored_topic_spec(settings)
scored_topic = app.topic(_SCORED.name, internal=True, partitions=_SCORED.partitions,
                         key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", config=_SCORED.config)

quality_by_version = app.Table(
    "quality_by_version", key_type=str, partitions=1,
    extra_topic_configs=SUMMARY_CHANGELOG_CONFIG,
    help="Prequential quality per model version on labelled events: n, accuracy and log loss "
         "(a regression's RMSE, MAE and R2), and rolling figures (half-life "
         f"{QUALITY_HALF_LIFE} events).")

#: The one key of ``rollout_figures``.
ROLLOUT_KEY = "rollout"
rollout_figures = app.Table(
    "rollout_figures", key_type=str, partitions=1,
    extra_topic_configs=SUMMARY_CHANGELOG_CONFIG,
    help="The rollout policy's figures for the rollout in progress: labelled events, loss "
         "sums of the serving version and of the candidate since it began (one row).")


def log_loss_sum(batch: LabelledBatch, weights: np.ndarray | None = None) -> float:
    """Sum of ``batch``'s log losses (weighted by ``weights``), as :func:`models.metrics.log_loss`
    computes them: the batch layer's test log loss is the mean of the same figure."""
    return log_loss(batch.labels, batch.probabilities, sample_weight=weights, normalize=False)


def _rolling(n: int, m: int) -> tuple[np.ndarray, float]:
    """How ``m`` new events, after ``n`` seen, move a rolling figure: ``r_after = keep *
    r_before + weights @ x``.

    Each event moves a rolling figure r by r <- r + a (x - r), with a = 1/n while fewer than
    1/alpha events were seen (the plain mean is the better estimate then) and alpha after,
    where alpha halves an event's weight every :data:`QUALITY_HALF_LIFE` events: so
    ``weights[i] = a_i * prod_{j > i} (1 - a_j)`` and ``keep = prod_j (1 - a_j)``.
    """
    alpha = 1 - 0.5 ** (1 / QUALITY_HALF_LIFE)
    steps = np.maximum(alpha, 1.0 / np.arange(n + 1, n + m + 1, dtype=np.float64))
    after = np.append(np.cumprod((1.0 - steps)[::-1])[::-1], 1.0)  # prod_{j >= i} (1 - a_j)
    return steps * after[1:], float(after[0])


def update_quality(row: dict[str, Any] | None, batch: LabelledBatch,
                   now_ms: int) -> dict[str, Any]:
    """A version's ``quality_by_version`` row after ``batch`` (all predicted by it).

    For a classification, ``accuracy`` and ``log_loss`` cover every labelled event the version
    predicted; ``rolling_accuracy`` and ``rolling_log_loss`` are exponentially weighted
    averages whose weights halve every :data:`QUALITY_HALF_LIFE` events back. A regression's
    row has :func:`update_regression_quality`'s figures instead.
    """
    if batch.task == REGRESSION:
        return update_regression_quality(row, batch, now_ms)
    if row is not None and row.get("task", CLASSIFICATION) != CLASSIFICATION:
        row = None  # a version's task never changes; a stray row starts afresh
    row = dict(row) if row else {"task": CLASSIFICATION, "n": 0, "correct": 0,
                                 "log_loss_sum": 0.0, "rolling_accuracy": None,
                                 "rolling_log_loss": None, "first_ms": now_ms}
    hits = batch.correct.astype(np.float64)
    n, m = row["n"], len(hits)
    weights, keep = _rolling(n, m)
    r_acc = keep * (row["rolling_accuracy"] or 0.0) + float(weights @ hits)
    r_loss = keep * (row["rolling_log_loss"] or 0.0) + log_loss_sum(batch, weights)
    n += m
    correct = row["correct"] + int(hits.sum())
    loss_sum = row["log_loss_sum"] + log_loss_sum(batch)
    row.update({"task": CLASSIFICATION, "n": n, "correct": correct, "log_loss_sum": loss_sum,
                "accuracy": correct / n if n else None,
                "log_loss": loss_sum / n if n else None,
                "rolling_accuracy": r_acc, "rolling_log_loss": r_loss, "last_ms": now_ms})
    return row


def update_regression_quality(row: dict[str, Any] | None, batch: LabelledBatch,
                              now_ms: int) -> dict[str, Any]:
    """A regression version's ``quality_by_version`` row after ``batch``.

    ``rmse``, ``mae`` and ``r2`` cover every labelled event the version predicted (the
    batch layer's test metrics of the same names, measured live); ``rolling_rmse`` is the
    square root of an exponentially weighted mean squared error and ``rolling_mae`` the
    exponentially weighted mean absolute error, with the weights of the classification's
    rolling figures (halving every :data:`QUALITY_HALF_LIFE` events back). ``r2`` is ``1 -
    SSE / SST``, SST around the mean of the labels seen (kept as a count, mean and sum of
    squared deviations, merged batch by batch); None until the labels vary.
    """
    if row is not None and row.get("task") != REGRESSION:
        row = None
    row = dict(row) if row else {"task": REGRESSION, "n": 0, "squared_error_sum": 0.0,
                                 "absolute_error_sum": 0.0, "label_mean": 0.0,
                                 "label_m2": 0.0, "rolling_mse": None, "rolling_mae": None,
                                 "first_ms": now_ms}
    errors = batch.errors
    squared, absolute = np.square(errors), np.abs(errors)
    n, m = row["n"], len(errors)
    weights, keep = _rolling(n, m)
    r_mse = keep * (row["rolling_mse"] or 0.0) + float(weights @ squared)
    r_mae = keep * (row["rolling_mae"] or 0.0) + float(weights @ absolute)
    labels = batch.labels.astype(np.float64)
    # Chan et al.'s merge of (count, mean, M2): stable where sums of squares cancel.
    mean_b = float(labels.mean()) if m else 0.0
    m2_b = float(np.square(labels - mean_b).sum())
    delta = mean_b - row["label_mean"]
    total = n + m
    label_mean = row["label_mean"] + delta * m / total if total else 0.0
    label_m2 = row["label_m2"] + m2_b + delta * delta * n * m / total if total else 0.0
    sse = row["squared_error_sum"] + float(squared.sum())
    sae = row["absolute_error_sum"] + float(absolute.sum())
    row.update({"task": REGRESSION, "n": total, "squared_error_sum": sse,
                "absolute_error_sum": sae, "label_mean": label_mean, "label_m2": label_m2,
                "rmse": math.sqrt(sse / total) if total else None,
                "mae": sae / total if total else None,
                "r2": 1.0 - sse / label_m2 if label_m2 > 0 else None,
                "rolling_mse": r_mse, "rolling_rmse": math.sqrt(r_mse),
                "rolling_mae": r_mae, "last_ms": now_ms})
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

    process: ProcessPoolExecutor | None

    def start(self) -> None:
        """Start the learning process (its imports take seconds: better at start-up)."""
        if self.process is None:
            process = _learning_process()
            process.submit(int)
            self.process = process

    def __init__(self) -> None:
        self.process = None
        #: The base version whose learner the learning process holds.
        self.process_base: str | None = None
        self.pending_base: str | None = None
        #: Examples of the serving base since the last refit, in chunks as they came.
        self.pending_X: list[np.ndarray] = []
        self.pending_y: list[np.ndarray] = []
        self.published: ModelUpdate | None = None
        self.updates_published = 0
        #: Whether this worker holds the scored-summary partition now (Faust's rebalance
        #: signals tell it), and the count of assignments and revocations seen: a refit
        #: started in one generation is not published in another.
        self.learner = False
        self.generation = 0
        #: The generation whose update chain the model manager has read to its end.
        self._caught_up: int | None = None
        #: The publication under way, which a revocation waits for.
        self._sending: asyncio.Future[Any] | None = None

    # -- ownership of the scored-summary partition

    async def on_partitions_assigned(self, sender: Any, assigned: Any, **kwargs: Any) -> None:
        """A new assignment: this worker is the learner if it holds the scored partition."""
        self.generation += 1
        self.learner = any(tp.topic == SCORED_TOPIC for tp in assigned)
        if self.learner:
            log.info("this worker is the speed layer's learner (generation %d)",
                     self.generation)

    async def on_partitions_revoked(self, sender: Any, revoked: Any, **kwargs: Any) -> None:
        """The scored partition is revoked: drop what was buffered, publish nothing more, and
        wait for a send under way, before the worker rejoins the group."""
        if any(tp.topic == SCORED_TOPIC for tp in revoked):
            await self.stop_learning("its partition was revoked")

    async def on_before_shutdown(self, sender: Any = None, **kwargs: Any) -> None:
        """The worker stops (Faust sends this before its consumer leaves the group)."""
        await self.stop_learning("the worker stops")

    async def stop_learning(self, why: str) -> None:
        """Stop being the learner; return once no publication is under way."""
        was, dropped = self.learner, self.pending
        self.learner = False
        self.generation += 1
        self.pending_base = None
        self.pending_X, self.pending_y = [], []
        # The learning process's learner holds examples of this generation too: the next
        # refit sends the base, which starts a new one.
        self.process_base = None
        if was or dropped:
            log.info("no longer the speed layer's learner (%s): %d buffered examples dropped",
                     why, dropped)
        sending = self._sending
        if sending is not None:
            await asyncio.wait([sending])

    def holds(self, generation: int) -> bool:
        """Whether this worker is still the learner of ``generation``."""
        return self.learner and self.generation == generation

    async def catch_up(self, generation: int) -> bool:
        """Whether the model manager has handled the update topic up to its end as read now,
        after the assignment of ``generation``; waits up to ``SPEED_WINDOW_S`` once per
        generation."""
        if self._caught_up == generation:
            return True
        end = await model_manager.end_offset()
        if end > 0 and not await model_manager.wait_for_offset(end - 1,
                                                                settings.speed_window_s):
            log.info("not publishing yet: the model manager has not read the update topic "
                     "up to offset %d", end)
            return False
        if not self.holds(generation):
            return False
        self._caught_up = generation
        return True

    @property
    def pending(self) -> int:
        """Examples waiting for the next refit."""
        return sum(len(y) for y in self.pending_y)

    def collect(self, batches: Sequence[LabelledBatch], base: LoadedModel | None) -> int:
        """Keep the examples predicted by ``base`` (or an update of it); return how many.

        Labels are class indexes for a classification and the numeric labels for a
        regression, as :class:`~models.online.OutputLayerLearner` takes them."""
        if base is None:
            return 0
        if self.pending_base != base.base_version:
            self.pending_base = base.base_version
            self.pending_X, self.pending_y = [], []
        kept = 0
        for batch in batches:
            if batch.base_version == base.base_version and batch.task == base.task and \
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
        """Refit and publish once if this worker is the learner and the base has enough new
        examples; the update or None."""
        if not self.learner:
            return None
        generation = self.generation
        base = model_manager.base
        if base is None or self.pending_base != base.base_version:
            return None
        new = self.pending
        if new < settings.speed_min_examples:
            return None
        if not await self.catch_up(generation):
            return None
        base = model_manager.base
        if base is None or self.pending_base != base.base_version:
            return None
        new = self.pending
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
        if not self.holds(generation):
            # Its successor numbers the chain now: this seq may be (or become) theirs. The
            # learning process learnt from the dropped examples: its next learner starts anew.
            self.process_base = None
            log.info("update %s not published: this worker is no longer the learner",
                     update.version)
            return None
        if not worker_lease.held:
            # Perhaps no longer the learner: its successor may be publishing this seq.
            log.warning("update %s not published: this worker's partitions are in doubt after "
                        "a stall", update.version)
            return None
        self._sending = asyncio.ensure_future(app.producer.send_and_wait(
            settings.updates_topic, update.model.encode(), orjson.dumps(update.to_message()),
            partition=0, timestamp=None, headers=None))
        try:
            await self._sending
        finally:
            self._sending = None
        self.published = update
        self.updates_published += 1
        fit = update.extra["fit"]
        figure = "rmse" if base.task == REGRESSION else "accuracy"
        log.info("published update %s from %d examples (%d new) in %.2fs: weighted %s "
                 "%.4g -> %.4g", update.version, update.n_examples, new, fit_s, figure,
                 fit[f"{figure}_before"], fit[f"{figure}_after"])
        return update




def batch_losses(batch: LabelledBatch) -> np.ndarray:
    """Per-event loss the rollout policy compares: a miss (1.0) or hit (0.0) of a
    classification, the squared error of a regression."""
    if batch.task == REGRESSION:
        losses: np.ndarray = np.square(batch.errors)
        return losses
    return (~batch.correct).astype(np.float64)


class RolloutPolicy:
    """The automatic end of a rollout, run where the quality is measured: by the worker that
    holds the scored partition (the speed layer's learner), so one worker decides.

    After ``ROLLOUT_MIN_EVENTS`` labelled events of the candidate and of the serving version
    since the rollout began, :func:`transport.rollout.decide` promotes a candidate that is not
    worse by more than ``ROLLOUT_MARGIN`` and aborts one that is significantly worse (level
    ``ROLLOUT_ALPHA``); the decision goes on the update topic with its figures (``by``
    ``"policy"``). The figures are kept in the one-row table ``rollout_figures`` beside the
    quality table, so a worker that takes the scored partition over (its changelog restored)
    goes on counting where the last holder stopped."""

    def __init__(self) -> None:
        self.tracker = Tracker()
        self.published: list[dict[str, Any]] = []

    def observe(self, batches: Sequence[LabelledBatch], partition: int | None = None) -> None:
        """Count ``batches`` for the rollout the update topic names now, from the figures
        in ``rollout_figures`` when they are of that rollout; with the scored ``partition``
        (in an event's context), store them there again."""
        rollout = protocol.candidate(model_manager.ledger.topic)
        base = model_manager.base
        tracker = self.tracker
        tracker.follow(rollout.version if rollout else None,
                       rollout.since if rollout else None,
                       base.base_version if base is not None else None)
        stored = rollout_figures.data.get(ROLLOUT_KEY)
        if stored is not None:
            tracker.restore(stored)
        for batch in batches:
            tracker.observe(batch.base_version, batch.task, batch_losses(batch))
        if partition is not None and tracker.key is not None:
            self.store(partition)

    def store(self, partition: int) -> None:
        """Write the figures to ``rollout_figures`` (store and changelog)."""
        state = self.tracker.state()
        rollout_figures.data[ROLLOUT_KEY] = state
        rollout_figures.send_changelog(partition, ROLLOUT_KEY, state)

    def verdict(self) -> Verdict | None:
        """The policy's verdict on the rollout in progress, None when there is none."""
        tracker = self.tracker
        if tracker.key is None or tracker.task is None:
            return None
        return decide(tracker.serving, tracker.candidate, tracker.task,
                      min_events=settings.rollout_min_events, margin=settings.rollout_margin,
                      alpha=settings.rollout_alpha, effect=settings.rollout_effect)

    async def step(self, batches: Sequence[LabelledBatch], partition: int | None = None
                   ) -> dict[str, Any] | None:
        """Count ``batches`` (stored with ``partition``, see :meth:`observe`); on the learner,
        publish a decision once there is one. Returns the message published, or None."""
        self.observe(batches, partition)
        tracker = self.tracker
        if not speed_layer.learner or tracker.key is None or tracker.decided == tracker.key:
            return None
        verdict = self.verdict()
        if verdict is None or verdict.action == "wait":
            return None
        if not worker_lease.held:
            return None
        kind = protocol.PROMOTE if verdict.action == "promote" else protocol.ABORT
        message = protocol.decision_message(
            kind, settings.model_name, tracker.key[0], "policy", verdict.reason,
            {**verdict.figures, "serving": tracker.serving_base},
            at=int(time.time() * 1000))
        await app.producer.send_and_wait(
            settings.updates_topic, settings.model_name.encode(), orjson.dumps(message),
            partition=0, timestamp=None, headers=None)
        tracker.decided = tracker.key
        if partition is not None:
            self.store(partition)
        self.published.append(message)
        log.warning("rollout of %s: %s (%s)", tracker.key[0], kind, verdict.reason)
        return message


rollout_policy = RolloutPolicy()
speed_layer = SpeedLayer()
# Receivers run before the consumer rejoins the group (Faust awaits them), as serving's do.
# (Faust's signal type asks for a ``signal`` keyword parameter; receivers get it in **kwargs.)
app.on_partitions_assigned.connect(speed_layer.on_partitions_assigned)  # type: ignore[arg-type]
app.on_partitions_revoked.connect(speed_layer.on_partitions_revoked)  # type: ignore[arg-type]
app.on_before_shutdown.connect(speed_layer.on_before_shutdown)  # type: ignore[arg-type]


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
        if not summary.shadow:
            count_scored(summary.version, summary.scored, summary.classes)
        if summary.labelled is not None:
            record_quality([summary.labelled], event.message.partition,
                           int(time.time() * 1000))
            try:
                await rollout_policy.step([summary.labelled], event.message.partition)
            except Exception:  # a failed send: the next labelled batch tries again
                log.exception("publishing the rollout policy's decision failed")
            if settings.speed_layer and not summary.shadow:
                speed_layer.collect([summary.labelled], model_manager.base)


async def publish_update() -> None:
    """Every ``SPEED_WINDOW_S`` on every worker: the learner refits and publishes if there is
    enough to learn from; the others do nothing."""
    try:
        await speed_layer.step()
    except Exception:  # a failed fit or send must not stop the timer; the next window retries
        log.exception("speed-layer update failed")


if settings.speed_layer:
    app.timer(settings.speed_window_s, name="speed_layer_updates")(publish_update)

    async def start_learner() -> None:
        """Start the learning process (and its imports) while the worker starts."""
        speed_layer.start()

    app.task(start_learner)

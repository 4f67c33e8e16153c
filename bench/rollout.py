"""Safe rollout on a live stream: the policy's decisions, what a bad candidate costs, shadow cost.

Starts its own Kafka + S3 on free ports and trains four small MLPs in-process on a synthetic
two-class problem with a known boundary (8 features, 6% label noise), each published with a
real manifest and reference rows:

* ``base``: trained briefly on few rows (decent); it serves first;
* ``better``: trained longer on many rows;
* ``worse``: trained on flipped labels;
* ``slightly_worse``: ``better`` with its decision threshold moved so that it is about one
  accuracy point below ``better`` (which serves by the time it is announced) on held-out
  rows.

Two workers of one group (speed layer on, so ``base`` gets ``UP`` updates) serve a steady
labelled feed (``--rate`` events/s) while the bench announces, in turn, ``better`` as a shadow
rollout, ``worse`` as a canary (share ``--share``) and ``slightly_worse`` as a canary; it waits
for the policy's ``PROMOTE``/``ABORT`` on the update topic (reporting the seconds from the
announcement to the decision and the labelled events in the decision's figures), counts the
predictions a canary candidate served, and for ``slightly_worse`` waits ``--hold`` seconds,
reports the figures of the policy's test on the predictions so far (``transport.rollout.decide``
on the labels the bench knows) and aborts it with ``POST /models/abort`` and the admin token.
Over the whole feed it checks: every fed id answered on ``predictions`` (lost, duplicates), and
per input partition in input-offset order, the version serving (base rank, update seq) never
going backwards (a canary's candidate predictions are counted apart).

Then (``--shadow-events`` > 0; ``--only-shadow`` runs this part alone) the shadow cost: one
worker (archive and speed layer off) on a backlog of demo events (30 features, half labelled),
model 30-500-1000-500-2, without a candidate and with a shadow candidate of the same size (the
policy held off by a huge ``ROLLOUT_MIN_EVENTS``): events answered per second and the worker's
CPU per event for both, their ratios, in ``--shadow-rounds`` rounds (alone, then shadow) with
the median ratios, and the raw model's ``predict_proba`` rate as a peer.

    .venv/bin/python bench/rollout.py [--rate 300] [--share 0.2] [--hold 60]
                                      [--shadow-events 60000] [--shadow-rounds 3]
                                      [--only-shadow | --no-shadow]

Prints progress with load averages; ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import copy
import asyncio
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402
from confluent_kafka import Consumer, TopicPartition  # noqa: E402

from app.settings import Settings  # noqa: E402
from devstack.harness import (PacedFeed, WorkerProcess, announce, http,  # noqa: E402
                              publish_small_model, scratch_dir)
from devstack.stack import LocalStack, free_port  # noqa: E402
from models.loaded import LoadedModel  # noqa: E402
from models.manifest import Manifest, Reference  # noqa: E402
from models.network import MLP  # noqa: E402
from models.preprocessing import fit_preprocessor  # noqa: E402
from models.registry import ModelRef, Registry  # noqa: E402
from transport.rollout import Quality, decide  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402
from demo.data import FEATURES  # noqa: E402
import serving as serving_bench  # noqa: E402  (bench/serving.py: backlog, counting, raw rate)

SYN_FEATURES = [f"x{i}" for i in range(8)]
CLASSES = ["neg", "pos"]
NOISE = 0.06
TOKEN = "bench-rollout-admin"
HIDDEN = (32, 16)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(message: str) -> None:
    print(f"[bench] {message} (load {load()})", flush=True)


# -- the synthetic problem and its models -----------------------------------------------------

def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels (0/1): the boundary ``x0 + 0.8 x1^2 + sin(2 x2) - 0.6 x3 x4 = 0.8``,
    labels flipped with probability NOISE."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(SYN_FEATURES)))
    f = X[:, 0] + 0.8 * X[:, 1] ** 2 + np.sin(2 * X[:, 2]) - 0.6 * X[:, 3] * X[:, 4] - 0.8
    y = (f > 0).astype(np.int64)
    flip = rng.random(n) < NOISE
    return X.round(4), np.where(flip, 1 - y, y)


def train(X: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> tuple[MLP, Any]:
    torch.manual_seed(seed)
    pre = fit_preprocessor(SYN_FEATURES, X)
    Z = torch.tensor(pre.transform(X), dtype=torch.float32)
    target = torch.tensor(y)
    module = MLP(Z.shape[1], 2, hidden=HIDDEN, dropout=0.0)
    optimiser = torch.optim.Adam(module.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(Z), generator=generator).split(256):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(module(Z[batch]), target[batch]).backward()
            optimiser.step()
    return module.eval(), pre


def publish_trained(registry: Registry, name: str, module: MLP, pre: Any,
                    X_test: np.ndarray, y_test: np.ndarray) -> tuple[ModelRef, float]:
    """Publish ``module`` with its preprocessing, its test accuracy as a metric and real
    reference rows; return the reference and the accuracy."""
    draft = Manifest.draft(name=name, features=SYN_FEATURES, classes=CLASSES,
                           task="classification", preprocessing=pre.to_dict(),
                           architecture=module.architecture(),
                           metrics={"accuracy": 0.5, "log_loss": 0.69, "auc": 0.5},
                           reference={"inputs": [[1.0] * len(SYN_FEATURES)],
                                      "outputs": [[0.5, 0.5]], "atol": 0.5})
    loaded = LoadedModel(draft, module)
    proba = loaded.outputs(X_test)
    accuracy = float((proba.argmax(axis=1) == y_test).mean())
    eps = 1e-7
    draft.metrics = {"accuracy": accuracy,
                     "log_loss": float(-np.mean(np.log(np.clip(
                         proba[np.arange(len(y_test)), y_test], eps, 1)))),
                     "auc": 0.5}
    draft.reference = Reference(inputs=X_test[:8].tolist(),
                                outputs=loaded.outputs(X_test[:8]).tolist(), atol=1e-5)
    return registry.publish(module, draft, onnx=False), accuracy


def build_models(registry: Registry, name: str) -> tuple[dict[str, ModelRef],
                                                         dict[str, float]]:
    X_test, y_test = synthetic(40_000, seed=99)
    X_small, y_small = synthetic(400, seed=1)
    X_big, y_big = synthetic(20_000, seed=2)
    base, base_pre = train(X_small, y_small, epochs=8, seed=0)
    better, better_pre = train(X_big, y_big, epochs=15, seed=0)
    worse, worse_pre = train(X_small, 1 - y_small, epochs=8, seed=0)
    # Slightly worse: better (which serves by then) with a bias added to the positive logit,
    # sized by bisection for an accuracy about one point below better's on the held-out rows.
    Z = torch.tensor(better_pre.transform(X_test), dtype=torch.float32)
    with torch.no_grad():
        logits = better(Z).numpy()
    better_acc = float((logits.argmax(axis=1) == y_test).mean())
    lo, hi = 0.0, 5.0
    for _ in range(40):
        mid = (lo + hi) / 2
        acc = float(((logits + np.array([0.0, mid])).argmax(axis=1) == y_test).mean())
        lo, hi = (mid, hi) if acc > better_acc - 0.01 else (lo, mid)
    slight = copy.deepcopy(better)
    with torch.no_grad():
        output = [m for m in slight.modules() if isinstance(m, torch.nn.Linear)][-1]
        output.bias[1] += hi
    refs, accuracy = {}, {}
    for key, module, pre in (("base", base, base_pre), ("better", better, better_pre),
                             ("worse", worse, worse_pre),
                             ("slightly_worse", slight, better_pre)):
        refs[key], accuracy[key] = publish_trained(registry, name, module, pre, X_test, y_test)
    return refs, accuracy


# -- the feed and the readers -----------------------------------------------------------------

class Feed(PacedFeed):
    """Labelled synthetic events at a steady rate from a thread; ids ``r-<n>``; each id's
    input (partition, offset) from the delivery reports."""

    reports = True

    def __init__(self, bootstrap: str, topic: str, rate: float) -> None:
        n = 2_000_000 if rate * 3600 > 2e6 else int(rate * 3600)
        super().__init__(bootstrap, topic, rate, limit=n)
        self.X, self.y = synthetic(n, seed=123)
        self.placed: dict[str, tuple[int, int]] = {}
        self.failed = 0

    def label(self, id_: str) -> int:
        return int(self.y[int(id_[2:])])

    def message(self, n: int) -> tuple[bytes, bytes]:
        id_ = f"r-{n}"
        return id_.encode(), orjson.dumps({"id": id_, "features": self.X[n].tolist(),
                                           "label": CLASSES[self.y[n]]})

    def delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
        else:
            self.placed[msg.key().decode()] = (msg.partition(), msg.offset())


class Reader:
    """Every message of ``topic`` from the start, from a thread: (partition, offset, broker
    timestamp ms, value)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap,
                                  "group.id": f"bench-rollout-reader-{topic}",
                                  "enable.auto.commit": False})
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        self.rows: list[tuple[int, int, int, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self.consumer.consume(1000, 0.2)
            rows = [(m.partition(), m.offset(), m.timestamp()[1], orjson.loads(m.value()))
                    for m in batch if not m.error() and m.value() is not None]
            with self.lock:
                self.rows.extend(rows)

    def snapshot(self) -> list[tuple[int, int, int, dict[str, Any]]]:
        with self.lock:
            return list(self.rows)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.consumer.close()


def wait_decision(updates: Reader, version: str, timeout: float
                  ) -> tuple[int, dict[str, Any]] | None:
    """The first PROMOTE/ABORT of ``version`` on the update topic within ``timeout`` s:
    (broker timestamp ms, message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, _, ts, m in updates.snapshot():
            if m.get("type") in ("PROMOTE", "ABORT") and m.get("version") == version:
                return ts, m
        time.sleep(0.2)
    return None


def announced_ts(updates: Reader, version: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, _, ts, m in updates.snapshot():
            if m.get("type", "MODEL-REF") == "MODEL-REF" and m.get("version") == version:
                return ts
        time.sleep(0.1)
    raise TimeoutError(f"announcement of {version} not seen")


# -- part 1: the rollouts ---------------------------------------------------------------------

def rollouts(args: argparse.Namespace, stack: LocalStack, work: Path) -> dict[str, Any]:
    env = {**stack.environment("bench"), "STRATUM_APP_ID": "bench-rollout",
           "TOPIC_PARTITIONS": str(args.partitions), "SPEED_LAYER": "1", "ARCHIVE": "0",
           "ADMIN_TOKEN": TOKEN, "ROLLOUT_MODE": "canary",
           "ROLLOUT_CANARY_SHARE": str(args.share),
           "ROLLOUT_MIN_EVENTS": str(args.min_events), "ROLLOUT_MARGIN": str(args.margin),
           "ROLLOUT_ALPHA": str(args.alpha), "ROLLOUT_EFFECT": str(args.effect),
           "TORCH_THREADS": "1"}
    settings = Settings.from_env({**env, "WEB_PORT": "1"})
    registry = Registry(settings.registry_uri, settings.storage_options)
    say("training and publishing base, better, worse, slightly_worse")
    refs, accuracy = build_models(registry, settings.model_name)
    versions = {k: r.version for k, r in refs.items()}
    say(f"held-out accuracy: {json.dumps({k: round(v, 4) for k, v in accuracy.items()})}")
    asyncio.run(ensure_topics(settings))
    asyncio.run(announce(settings.bootstrap_servers, settings.updates_topic,
                         refs["base"].to_message()))
    workers = [WorkerProcess({**env, "WEB_PORT": str(free_port()),
                              "STRATUM_DATA_DIR": str(work / f"worker-{i}")},
                             work / f"worker-{i}.log").start() for i in range(2)]
    updates = Reader(settings.bootstrap_servers, settings.updates_topic)
    predictions = Reader(settings.bootstrap_servers, settings.predictions_topic)
    feed = Feed(settings.bootstrap_servers, settings.events_topic, args.rate)
    figures: dict[str, Any] = {"rate_per_s": args.rate, "workers": 2, "share": args.share,
                               "min_events": args.min_events, "margin": args.margin,
                               "alpha": args.alpha, "effect": args.effect,
                               "held_out_accuracy": {k: round(v, 4)
                                                     for k, v in accuracy.items()}}
    rank = {versions[k]: i for i, k in enumerate(("base", "better", "worse",
                                                  "slightly_worse"))}
    try:
        for w in workers:
            w.wait_ready(timeout=180)
        say(f"two workers serving base {versions['base']}; feeding {args.rate:.0f} "
            f"labelled events/s")
        feed.start()
        time.sleep(args.warmup)

        def roll(key: str, mode: str, timeout: float) -> dict[str, Any]:
            rollout: dict[str, Any] = {"mode": mode}
            if mode == "canary":
                rollout["share"] = args.share
            sent_before = feed.sent
            asyncio.run(announce(settings.bootstrap_servers, settings.updates_topic,
                                 {**refs[key].to_message(), "rollout": rollout}))
            at = announced_ts(updates, versions[key])
            say(f"announced {key} {versions[key]} as {rollout}")
            found = wait_decision(updates, versions[key], timeout)
            out: dict[str, Any] = {"version": versions[key], "rollout": rollout,
                                   "announced_ms": at}
            if found is None:
                out["decision"] = None
                say(f"{key}: no decision within {timeout:.0f}s")
                return out
            ts, message = found
            f = message.get("figures", {})
            out.update(decision=message["type"], by=message.get("by"),
                       reason=message.get("reason"), decision_ms=ts,
                       seconds_to_decision=round((ts - at) / 1000, 2),
                       labelled_events_candidate=f.get("n_candidate"),
                       labelled_events_serving=f.get("n_serving"),
                       events_fed_meanwhile=feed.sent - sent_before,
                       figures=f)
            say(f"{key}: {message['type']} by {message.get('by')} after "
                f"{out['seconds_to_decision']}s on {f.get('n_candidate')} candidate / "
                f"{f.get('n_serving')} serving labelled events ({message.get('reason')})")
            return out

        figures["better"] = roll("better", "shadow", args.decision_timeout)
        time.sleep(args.pause)
        figures["worse"] = roll("worse", "canary", args.decision_timeout)
        time.sleep(args.pause)
        slight = roll("slightly_worse", "canary", args.hold)
        if slight["decision"] is None:
            # The test's figures on what the policy saw so far: the canary's predictions and
            # the serving version's, since the announcement, against the labels.
            serving_q, cand_q = Quality(), Quality()
            for _, _, ts, p in predictions.snapshot():
                if ts < slight["announced_ms"] or not p.get("id", "").startswith("r-"):
                    continue
                miss = np.array([float(p["predicted"] != CLASSES[feed.label(p["id"])])])
                if p["model_version"] == versions["slightly_worse"]:
                    cand_q.add(miss)
                elif p["model_version"].split("+")[0] != versions["slightly_worse"]:
                    serving_q.add(miss)
            verdict = decide(serving_q, cand_q, "classification", min_events=args.min_events,
                             margin=args.margin, alpha=args.alpha, effect=args.effect)
            slight["at_end_of_hold"] = {"verdict": verdict.action, "reason": verdict.reason,
                                        **verdict.figures}
            say(f"slightly_worse after {args.hold:.0f}s: no decision; the test on the "
                f"predictions so far: {verdict.action} ({verdict.reason}); "
                f"accuracy candidate {verdict.figures.get('accuracy_candidate')}, serving "
                f"{verdict.figures.get('accuracy_serving')}, n {cand_q.n}/{serving_q.n}")
            status, body, _ = http("POST", f"{workers[0].url}/models/abort",
                                   {"version": versions["slightly_worse"],
                                    "reason": "bench: held without promotion"}, token=TOKEN)
            slight["operator_abort_status"] = status
            decision = (body.get("rollout") or {}).get("decision") if isinstance(
                body, dict) else None
            slight["operator_abort"] = decision and {k: decision.get(k) for k in
                                                    ("type", "version", "by", "reason")}
            found = wait_decision(updates, versions["slightly_worse"], 30)
            if found:
                slight["decision_ms"] = found[0]
            say(f"operator abort: HTTP {status}, {slight['operator_abort']}")
        figures["slightly_worse"] = slight
        time.sleep(args.pause)
        sent = feed.stop()
        say(f"feed stopped after {sent} events; waiting for every prediction")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ids = {p["id"] for *_, p in predictions.snapshot()}
            if len(ids) >= sent:
                break
            time.sleep(1)
        time.sleep(3)
        models = [http("GET", f"{w.url}/models/")[1] for w in workers]
    finally:
        if feed._thread.is_alive():
            feed.stop()
        for w in workers:
            w.stop()
        predictions.stop()
        updates.stop()

    rows = predictions.snapshot()
    ids = [p["id"] for *_, p in rows]
    fed = {f"r-{n}" for n in range(sent)}
    lost = len(fed - set(ids))
    figures.update(events=sent, feed_failed=feed.failed, predictions=len(rows), lost=lost,
                   duplicates=len(ids) - len(set(ids)), unexpected_ids=len(set(ids) - fed))
    # Canary predictions of the aborted candidates, and whether any came after their ABORT.
    for key in ("worse", "slightly_worse"):
        mine = [ts for _, _, ts, p in rows if p["model_version"] == versions[key]]
        end = figures[key].get("decision_ms")
        figures[key]["canary_predictions_served"] = len(mine)
        figures[key]["served_after_decision"] = (sum(t > end for t in mine)
                                                 if end is not None else None)
        # How long after the decision's broker time the last of them was written: a worker
        # applies the ABORT when it reads it, after the micro-batches it has already scored.
        figures[key]["last_after_decision_ms"] = (max([t - end for t in mine if t > end],
                                                      default=0)
                                                  if end is not None else None)
        if figures[key].get("canary_predictions_served"):
            hits = sum(p["predicted"] == CLASSES[feed.label(p["id"])] for *_, p in rows
                       if p["model_version"] == versions[key])
            figures[key]["canary_accuracy"] = round(hits / len(mine), 4)
        say(f"{key}: {len(mine)} canary predictions, {figures[key]['served_after_decision']} "
            f"written after the decision, the last {figures[key]['last_after_decision_ms']} ms "
            f"after it")
    # Versions never going backwards: per input partition in input-offset order, the version
    # serving (rank of its base, update seq), canary predictions of aborted candidates apart.
    aborted = {versions["worse"], versions["slightly_worse"]}
    by_input: dict[int, list[tuple[int, tuple[int, int], str]]] = defaultdict(list)
    for *_, p in rows:
        if p["model_version"] in aborted or p["id"] not in feed.placed:
            continue
        base, _, seq = p["model_version"].partition("+")
        part, offset = feed.placed[p["id"]]
        by_input[part].append((offset, (rank[base], int(seq or 0)), p["model_version"]))
    backwards = []
    for part, seq_rows in by_input.items():
        seq_rows.sort()
        highest: tuple[int, int] = (-1, -1)
        top = ""
        for offset, key, version in seq_rows:
            if key < highest:
                backwards.append({"partition": part, "offset": offset, "version": version,
                                  "after": top})
            elif key > highest:
                highest, top = key, version
    figures["versions_backwards"] = len(backwards)
    figures["backwards_examples"] = backwards[:5]
    served = defaultdict(int)
    for *_, p in rows:
        served[p["model_version"].split("+")[0]] += 1
    figures["predictions_by_base"] = {k: served.get(v, 0) for k, v in versions.items()}
    figures["active_at_end"] = [m.get("active") for m in models]
    figures["updates_applied"] = [m.get("updates_applied") for m in models]
    say(f"{len(rows)} predictions for {sent} events: lost {lost}, duplicates "
        f"{figures['duplicates']}, backwards {len(backwards)}; by base "
        f"{figures['predictions_by_base']}; active at the end {figures['active_at_end']}")
    return figures


# -- part 2: the shadow cost ------------------------------------------------------------------

def shadow_cost(args: argparse.Namespace, stack: LocalStack, work: Path) -> dict[str, Any]:
    settings = Settings.from_env(stack.environment("bench"))
    registry = Registry(settings.registry_uri, settings.storage_options)
    hidden = (500, 1000, 500)
    base = publish_small_model(registry, "shadowcost", list(FEATURES), ["b", "s"], seed=1,
                               hidden=hidden)
    cand = publish_small_model(registry, "shadowcost", list(FEATURES), ["b", "s"], seed=2,
                               hidden=hidden)
    say(f"shadow cost: published two 30-500-1000-500-2 versions; backlog "
        f"{args.shadow_events} demo events per run")
    figures: dict[str, Any] = {"events": args.shadow_events, "network": "30-500-1000-500-2",
                               "batch_size": 512, "torch_threads": 1, "load_before": load()}
    model = registry.load(base.manifest_uri, base.sha256)
    figures["raw_per_s"] = round(serving_bench.raw_inference(model, 512, 1))
    # Alone and with a shadow, in turn, for several rounds: a shift of the shared machine's
    # load between two runs moves both sides of a round's ratio alike.
    rounds: list[dict[str, Any]] = []
    for k in range(args.shadow_rounds):
        pair = {name: cost_run(f"{name}-{k}", shadow, base, cand, args, stack, work)
                for name, shadow in (("alone", False), ("shadow", True))}
        pair["alone_over_shadow"] = round(pair["alone"]["per_s"] / pair["shadow"]["per_s"], 2)
        pair["shadow_cpu_over_alone"] = round(pair["shadow"]["cpu_us_per_event"]
                                              / pair["alone"]["cpu_us_per_event"], 2)
        say(f"shadow cost, round {k + 1}: alone {pair['alone']['per_s']}/s, with a shadow "
            f"candidate {pair['shadow']['per_s']}/s: {pair['alone_over_shadow']}x the time per "
            f"event (CPU {pair['shadow_cpu_over_alone']}x)")
        rounds.append(pair)
    figures["rounds"] = rounds
    figures["load_after"] = load()
    for key in ("alone_over_shadow", "shadow_cpu_over_alone"):
        figures[key] = statistics.median(r[key] for r in rounds)
    say(f"shadow cost, median of {len(rounds)} rounds: {figures['alone_over_shadow']}x the time "
        f"per event, CPU {figures['shadow_cpu_over_alone']}x; raw model "
        f"{figures['raw_per_s']}/s; load {figures['load_before']} -> {figures['load_after']}")
    return figures


def cost_run(name: str, shadow: bool, base: ModelRef, cand: ModelRef, args: argparse.Namespace,
             stack: LocalStack, work: Path) -> dict[str, Any]:
    """One worker drains a backlog of ``args.shadow_events`` with the base version serving,
    and ``cand`` in shadow if ``shadow``: its throughput and CPU per event."""
    env = {**stack.environment("bench"), "STRATUM_APP_ID": f"bench-cost-{name}",
           "MODEL_NAME": "shadowcost", "WEB_PORT": str(free_port()),
           "STRATUM_DATA_DIR": str(work / f"cost-{name}"),
           "EVENTS_TOPIC": f"cost-{name}-events",
           "PREDICTIONS_TOPIC": f"cost-{name}-predictions",
           "DLQ_TOPIC": f"cost-{name}-dlq", "UPDATES_TOPIC": f"cost-{name}-updates",
           "METRICS_TOPIC": f"cost-{name}-metrics", "SHADOW_TOPIC": f"cost-{name}-shadow",
           "TOPIC_PARTITIONS": str(args.partitions), "ARCHIVE": "0", "SPEED_LAYER": "0",
           "SERVING_BATCH_SIZE": "512", "TORCH_THREADS": "1",
           "ROLLOUT_MIN_EVENTS": "1000000000"}
    s = Settings.from_env(env)
    asyncio.run(ensure_topics(s))
    asyncio.run(announce(s.bootstrap_servers, s.updates_topic, base.to_message()))
    if shadow:
        asyncio.run(announce(s.bootstrap_servers, s.updates_topic,
                             {**cand.to_message(), "rollout": {"mode": "shadow"}}))
    worker = WorkerProcess(env, work / f"cost-{name}.log").start()
    try:
        worker.wait_ready(timeout=180)
        if shadow:
            deadline = time.monotonic() + 120
            while not ((r := http("GET", f"{worker.url}/models/")[1].get("rollout"))
                       and r.get("loaded")):
                assert time.monotonic() < deadline, "shadow candidate never loaded"
                time.sleep(0.25)
        serving_bench.produce_backlog(s.bootstrap_servers, s.events_topic, args.shadow_events)
        result = serving_bench.measure(
            f"cost-{name}", s.bootstrap_servers, [s.predictions_topic, s.dlq_topic],
            args.shadow_events, worker.proc.pid, stack.pids["kafka"], worker._check_alive)
        if shadow:
            result["shadow_predictions"] = serving_bench.count(s.bootstrap_servers,
                                                               [s.shadow_topic])
    finally:
        worker.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # (flag, default, help): the type is the default's.
    for flag, default, text in (
            ("--rate", 300.0, "labelled events/s fed"),
            ("--share", 0.2, "the canaries' share"),
            ("--min-events", 500, "ROLLOUT_MIN_EVENTS"),
            ("--margin", 0.01, "ROLLOUT_MARGIN"),
            ("--alpha", 0.05, "ROLLOUT_ALPHA"),
            ("--effect", 0.05, "ROLLOUT_EFFECT"),
            ("--hold", 60.0, "seconds to wait on the slightly worse candidate"),
            ("--decision-timeout", 180.0, "seconds to wait on a decision"),
            ("--warmup", 10.0, "seconds of feed before the first announcement"),
            ("--pause", 5.0, "seconds between rollouts"),
            ("--partitions", 4, "partitions of the input topic"),
            ("--shadow-events", 60_000, "backlog of each shadow-cost run"),
            ("--shadow-rounds", 3, "shadow-cost rounds (alone, then with a shadow)")):
        parser.add_argument(flag, type=type(default), default=default, help=text)
    parser.add_argument("--only-shadow", action="store_true")
    parser.add_argument("--no-shadow", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the run's data directory")
    args = parser.parse_args()

    figures: dict[str, Any] = {"load_before": load()}
    with scratch_dir("stratum-bench-rollout-", args.keep) as work, \
            LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        say(f"Kafka + S3 up on free ports (data in {work})")
        if not args.only_shadow:
            figures["rollouts"] = rollouts(args, stack, work)
        if args.shadow_events > 0 and not args.no_shadow:
            figures["shadow_cost"] = shadow_cost(args, stack, work)
    figures["load_after"] = load()
    print(json.dumps(figures), flush=True)
    r = figures.get("rollouts")
    ok = r is None or (r["lost"] == 0 and r["versions_backwards"] == 0
                       and r["better"].get("decision") == "PROMOTE"
                       and r["worse"].get("decision") == "ABORT"
                       # Not promoted: no decision within the wait, or an ABORT (the
                       # serving model keeps learning from the stream meanwhile, so a
                       # candidate one point worse offline is often further behind live).
                       and r["slightly_worse"].get("decision") != "PROMOTE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

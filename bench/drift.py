"""Concept drift: how fast rolling accuracy recovers after the decision boundary shifts.

Starts its own Kafka + S3 on free ports and trains a base model with the project's batch job
(``python -m batch run``) on a synthetic stream whose class is the side of a line in the plane
of the first two features (4 standard normal features, 5% label noise). Three deployments
(separate app ids, update and prediction topics) read the same input topic, each with one
worker:

* ``speed_on``: the speed layer learns from the labelled events (``SPEED_LAYER=1``);
* ``speed_off``: no speed layer;
* ``batch_rebuild``: no speed layer, and ``python -m batch run --data <post-shift data>``
  rebuilds the model some time after the shift.

The feed sends events at a steady rate, half of them labelled, and at a known moment the
boundary turns by 30 degrees and moves by 0.8 standard deviations. Rolling accuracy (trailing
window; after the shift only events sent after it count) is measured from each deployment's
predictions topic against the labels the bench knows, for every event, labelled or not.
Recovery is the time after the shift until rolling accuracy is back within 3 points of its
pre-shift level and stays there for a window.

    .venv/bin/python bench/drift.py [--rate 200] [--pre-s 60] [--post-s 120]
                                    [--rebuild-after-s 20] [--window-s 10] [--plot docs/drift.png]

Prints progress and figures, saves the three curves as a PNG, and ends with one line holding
a JSON object of the figures (``recovery_s_speed_on``, ``recovery_s_speed_off``,
``recovery_s_batch_rebuild``: seconds, or null when never within the run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from app.settings import Settings  # noqa: E402
from devstack.stack import LocalStack, free_port  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402
from devstack.harness import WorkerProcess, announce, consume_until, scratch_dir  # noqa: E402

FEATURES = ["x0", "x1", "x2", "x3"]
#: The boundary before and after the shift: it turns by 30 degrees and moves by 0.8 standard
#: deviations (the features are standard normal).
ANGLE_BEFORE, ANGLE_AFTER = np.pi / 4, np.pi / 4 - np.pi / 6
OFFSET_BEFORE, OFFSET_AFTER = 0.0, 0.8
LABEL_NOISE = 0.05
#: Recovery means back within this much of the pre-shift accuracy.
TOLERANCE = 0.03
DEPLOYMENTS = ("speed_on", "speed_off", "batch_rebuild")


def say(message: str) -> None:
    print(f"[drift {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sample(n: int, after_shift: bool, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` events: standard normal features, class = side of the boundary (a line in the
    plane of the first two features) before or after the shift, with label noise."""
    angle, offset = ((ANGLE_AFTER, OFFSET_AFTER) if after_shift
                     else (ANGLE_BEFORE, OFFSET_BEFORE))
    X = rng.normal(size=(n, len(FEATURES)))
    y = (X[:, 0] * np.cos(angle) + X[:, 1] * np.sin(angle) > offset).astype(np.int64)
    flip = rng.random(n) < LABEL_NOISE
    y[flip] = 1 - y[flip]
    return X, y


def write_dataset(uri: str, storage_options: dict[str, Any], n: int, after_shift: bool,
                  seed: int, prefix: str) -> None:
    """A Parquet training set at ``uri`` (columns id, features, label): the batch job's input."""
    X, y = sample(n, after_shift, np.random.default_rng(seed))
    frame = pd.DataFrame(X, columns=FEATURES)
    frame.insert(0, "id", [f"{prefix}-{i}" for i in range(n)])
    frame["label"] = y
    frame.to_parquet(f"{uri}/part-0.parquet", index=False, storage_options=storage_options)


@dataclass
class Deployment:
    name: str
    env: dict[str, str]
    settings: Settings
    worker: WorkerProcess | None = None
    #: event id -> (predicted class, model version, arrival time)
    predictions: dict[str, tuple[int, str, float]] = field(default_factory=dict)


def batch_env(env: dict[str, str], args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, **env, "BATCH_EPOCHS": str(args.epochs),
            "BATCH_MAX_TRAIN_SECONDS": str(args.train_seconds), "BATCH_DROPOUT": "0.1",
            "BATCH_KEEP_VERSIONS": "0"}


def run_batch(env: dict[str, str], data_uri: str, log_path: Path) -> int:
    """``python -m batch run --data data_uri``; its output goes to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.call([sys.executable, "-m", "batch", "run", "--data", data_uri],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


async def feed(bootstrap: str, topic: str, rate: float, pre_s: float,
               until: Callable[[], float], truth: dict[str, tuple[float, int]],
               t0: float) -> None:
    """Send events at ``rate``/s, half labelled; shift the boundary ``pre_s`` seconds in;
    stop at ``until()`` (a wall-clock time, asked again every tick).

    Fills ``truth``: id -> (send time relative to the shift, label).
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    rng = np.random.default_rng(7)
    shift_at = t0 + pre_s
    sent = 0
    try:
        while True:
            now = time.time()
            if now >= until():
                break
            due = int(rate * (now - t0)) - sent
            if due > 0:
                X, y = sample(due, now >= shift_at, rng)
                for row, label in zip(X.round(5).tolist(), y.tolist()):
                    event: dict[str, Any] = {"id": f"e{sent}", "features": row}
                    if sent % 2 == 0:
                        event["label"] = label
                    truth[event["id"]] = (now - shift_at, label)
                    await producer.send(topic, json.dumps(event).encode(),
                                        key=event["id"].encode())
                    sent += 1
            await asyncio.sleep(0.05)
        await producer.flush()
    finally:
        await producer.stop()


async def collect(bootstrap: str, deployments: list[Deployment], stop: asyncio.Event) -> None:
    """Read every deployment's predictions topic until ``stop`` is set."""
    by_topic = {d.settings.predictions_topic: d for d in deployments}
    consumer = AIOKafkaConsumer(*by_topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.time()
            for tp, records in batches.items():
                target = by_topic[tp.topic].predictions
                for r in records:
                    p = json.loads(r.value)
                    target[p["id"]] = (int(p["predicted"]), p["model_version"], now)
    finally:
        await consumer.stop()


def rolling_accuracy(truth: dict[str, tuple[float, int]],
                     predictions: dict[str, tuple[int, str, float]], window_s: float,
                     grid: np.ndarray) -> np.ndarray:
    """Accuracy over the trailing ``window_s`` at each grid time (relative to the shift).

    A window never reaches back across the shift: after it, only events sent after it count.
    NaN where the window holds fewer than 20 predicted events.
    """
    items = [(t, predictions[i][0] == label) for i, (t, label) in truth.items()
             if i in predictions]
    t = np.array([x[0] for x in items])
    hit = np.array([x[1] for x in items], dtype=np.float64)
    out = np.full(len(grid), np.nan)
    for k, g in enumerate(grid):
        start = g - window_s if g < 0 else max(g - window_s, 0.0)
        mask = (t > start) & (t <= g)
        if mask.sum() >= 20:
            out[k] = hit[mask].mean()
    return out


def recovery_seconds(grid: np.ndarray, acc: np.ndarray, level: float, hold_s: float
                     ) -> float | None:
    """First time after the shift from which accuracy stays within TOLERANCE of ``level``
    for ``hold_s`` seconds (or until the end of the run); None if never."""
    after = grid > 0
    times, values = grid[after], acc[after]
    ok = values >= level - TOLERANCE
    for k, t in enumerate(times):
        if not ok[k]:
            continue
        ahead = (times >= t) & (times <= t + hold_s) & ~np.isnan(values)
        if np.all(ok[ahead]):
            return round(float(t), 1)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--pre-s", type=float, default=60.0, help="seconds before the shift")
    parser.add_argument("--post-s", type=float, default=120.0,
                        help="seconds after the shift (longer if the rebuild needs it)")
    parser.add_argument("--rebuild-after-s", type=float, default=20.0,
                        help="seconds after the shift when the batch rebuild starts")
    parser.add_argument("--window-s", type=float, default=10.0, help="rolling window")
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-seconds", type=float, default=30.0,
                        help="training time budget of each batch run")
    parser.add_argument("--plot", default=str(REPO / "docs" / "drift.png"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's data directory (broker logs, worker logs, lake)")
    args = parser.parse_args()

    with scratch_dir("stratum-drift-", args.keep) as work, \
            LocalStack(data_dir=work / "stack", s3_buckets=["drift"]) as stack:
        say(f"Kafka + S3 up on free ports (data and logs in {work})")
        common = {**stack.environment("drift"),
                  "EVENTS_TOPIC": "drift-events", "TOPIC_PARTITIONS": "2", "ARCHIVE": "0"}
        deployments = []
        for name in DEPLOYMENTS:
            env = {**common, "STRATUM_APP_ID": f"drift-{name.replace('_', '-')}",
                   "PREDICTIONS_TOPIC": f"predictions-{name}", "UPDATES_TOPIC": f"updates-{name}",
                   "DLQ_TOPIC": f"dlq-{name}", "METRICS_TOPIC": f"metrics-{name}",
                   "WEB_PORT": str(free_port()), "STRATUM_DATA_DIR": str(work / name),
                   "SPEED_LAYER": "1" if name == "speed_on" else "0"}
            deployments.append(Deployment(name, env, Settings.from_env(env)))
        on, off, rebuild = deployments
        bootstrap = on.settings.bootstrap_servers
        storage = on.settings.storage_options
        pre_uri, post_uri = "s3://drift/data/pre-shift", "s3://drift/data/post-shift"
        write_dataset(pre_uri, storage, args.train_rows, False, seed=1, prefix="pre")
        write_dataset(post_uri, storage, args.train_rows, True, seed=2, prefix="post")
        say(f"wrote {args.train_rows} training rows before and after the shift")
        for d in deployments:
            asyncio.run(ensure_topics(d.settings))

        say("training the base model: python -m batch run --data " + pre_uri)
        started = time.monotonic()
        code = run_batch(batch_env(on.env, args), pre_uri, work / "batch-base.log")
        if code != 0:
            raise SystemExit(f"base training failed ({code}); see {work / 'batch-base.log'}")
        base_train_s = time.monotonic() - started
        ref = asyncio.run(consume_until(bootstrap, on.settings.updates_topic,
                                        lambda vs: any(v.get("type") == "MODEL-REF"
                                                       for v in vs)))[0]
        for d in (off, rebuild):
            asyncio.run(announce(bootstrap, d.settings.updates_topic, ref))
        say(f"base {ref['version']} in {base_train_s:.0f}s, test accuracy "
            f"{ref['metrics'].get('accuracy', float('nan')):.3f}; starting three workers")

        for d in deployments:
            d.worker = WorkerProcess(d.env, work / f"worker-{d.name}.log").start()
        try:
            for d in deployments:
                d.worker.wait_ready()
            figures = asyncio.run(stream(args, deployments, bootstrap, work,
                                         ref["version"]))
        finally:
            for d in deployments:
                if d.worker is not None:
                    d.worker.stop()
        ups = [v for v in asyncio.run(consume_until(bootstrap, on.settings.updates_topic,
                                                    lambda vs: True)) if v.get("type") == "UP"]

    fit_s = [u["fit"]["seconds"] for u in ups if "fit" in u]
    figures.update({
        "base_version": ref["version"], "base_test_accuracy": ref["metrics"].get("accuracy"),
        "base_train_s": round(base_train_s, 1), "updates_published": len(ups),
        "update_fit_s_mean": round(float(np.mean(fit_s)), 4) if fit_s else None,
        "update_fit_s_max": round(float(np.max(fit_s)), 4) if fit_s else None,
        "rate": args.rate, "labelled_fraction": 0.5, "window_s": args.window_s,
        "speed_window_s": on.settings.speed_window_s,
        "speed_half_life": on.settings.speed_half_life,
        "speed_buffer": on.settings.speed_buffer,
    })
    print(json.dumps(figures), flush=True)
    return 0


async def stream(args: argparse.Namespace, deployments: list[Deployment], bootstrap: str,
                 work: Path, base_version: str) -> dict[str, Any]:
    """Feed the events, rebuild once after the shift, and measure the three curves."""
    on, off, rebuild = deployments
    truth: dict[str, tuple[float, int]] = {}
    stop = asyncio.Event()
    collector = asyncio.create_task(collect(bootstrap, deployments, stop))
    t0 = time.time()
    shift_at = t0 + args.pre_s
    say(f"streaming {args.rate:.0f} events/s; the boundary turns in {args.pre_s:.0f}s")
    # The stream runs --post-s after the shift, and at least 30 s past the end of the rebuild
    # (at most --post-s + 300 s), so that the rebuilt model's effect is measured.
    ends = {"rebuild": None}

    def until() -> float:
        end = ends["rebuild"]
        if end is None:
            return shift_at + args.post_s + 300
        return max(shift_at + args.post_s, end + 30)

    feeder = asyncio.create_task(feed(bootstrap, on.settings.events_topic, args.rate,
                                      args.pre_s, until, truth, t0))

    async def rebuild_later() -> tuple[float, float, int]:
        await asyncio.sleep(max(shift_at + args.rebuild_after_s - time.time(), 0))
        begun = time.time() - shift_at
        say(f"shift + {begun:.0f}s: batch rebuild on post-shift data starts")
        code = await asyncio.to_thread(run_batch, batch_env(rebuild.env, args),
                                       "s3://drift/data/post-shift", work / "batch-rebuild.log")
        ends["rebuild"] = time.time()
        ended = time.time() - shift_at
        say(f"shift + {ended:.0f}s: batch rebuild ended with status {code}")
        return begun, ended, code

    rebuilder = asyncio.create_task(rebuild_later())
    reporter = asyncio.create_task(report_progress(deployments, truth, shift_at))
    await feeder
    rebuild_start, rebuild_end, rebuild_code = await rebuilder
    # Wait (bounded) for every deployment to predict every event.
    deadline = time.time() + 120
    while time.time() < deadline and any(len(d.predictions) < len(truth) for d in deployments):
        await asyncio.sleep(0.5)
    stop.set()
    reporter.cancel()
    await collector

    last = max(t for t, _ in truth.values())
    grid = np.arange(-args.pre_s + args.window_s, last + 0.001, 1.0)
    curves, figures = {}, {"shift_at_s": args.pre_s, "events": len(truth)}
    for d in deployments:
        acc = rolling_accuracy(truth, d.predictions, args.window_s, grid)
        curves[d.name] = acc
        pre = [(d.predictions[i][0] == y) for i, (t, y) in truth.items()
               if -30 <= t < 0 and i in d.predictions]
        level = float(np.mean(pre))
        late = [(d.predictions[i][0] == y) for i, (t, y) in truth.items()
                if t >= last - 30 and i in d.predictions]
        figures[f"recovery_s_{d.name}"] = recovery_seconds(grid, acc, level, args.window_s)
        figures[f"pre_shift_accuracy_{d.name}"] = round(level, 4)
        figures[f"final_accuracy_{d.name}"] = round(float(np.mean(late)), 4)
        figures[f"predicted_{d.name}"] = len(d.predictions)
        versions = {v for _, v, _ in d.predictions.values()}
        figures[f"versions_{d.name}"] = len(versions)
        say(f"{d.name}: pre-shift {level:.3f}, last 30 s {np.mean(late):.3f}, recovery "
            f"{figures[f'recovery_s_{d.name}']} s, {len(versions)} model versions")
    swapped = [truth[i][0] for i, (_, version, _) in rebuild.predictions.items()
               if version != base_version and i in truth]
    # The headline figures first.
    figures = {name: figures.pop(name) for name in (
        "recovery_s_speed_on", "recovery_s_speed_off", "recovery_s_batch_rebuild")} | figures
    figures.update({
        "rebuild_started_s": round(rebuild_start, 1), "rebuild_ended_s": round(rebuild_end, 1),
        "rebuild_exit_status": rebuild_code,
        "rebuilt_model_first_event_s": round(min(swapped), 1) if swapped else None,
    })
    plot(grid, curves, figures, args)
    return figures


async def report_progress(deployments: list[Deployment], truth: dict[str, tuple[float, int]],
                          shift_at: float) -> None:
    while True:
        await asyncio.sleep(15)
        recent = [(i, y) for i, (t, y) in list(truth.items())
                  if time.time() - shift_at - 15 <= t]
        parts = []
        for d in deployments:
            hits = [d.predictions[i][0] == y for i, y in recent if i in d.predictions]
            parts.append(f"{d.name} {np.mean(hits):.3f}" if hits else f"{d.name} -")
        say(f"shift {time.time() - shift_at:+.0f}s; accuracy, last 15 s: " + ", ".join(parts))


def plot(grid: np.ndarray, curves: dict[str, np.ndarray], figures: dict[str, Any],
         args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"speed_on": "speed layer on", "speed_off": "speed layer off",
              "batch_rebuild": "speed layer off, batch rebuild"}
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for name, acc in curves.items():
        recovery = figures.get(f"recovery_s_{name}")
        suffix = f" (recovers in {recovery:.0f} s)" if recovery is not None else \
            " (does not recover)"
        ax.plot(grid, acc, label=labels[name] + suffix, linewidth=1.6)
    level = figures["pre_shift_accuracy_speed_off"]
    ax.axhline(level - TOLERANCE, color="grey", linestyle=":", linewidth=1,
               label=f"pre-shift accuracy - {TOLERANCE * 100:.0f} points")
    ax.axvline(0, color="black", linewidth=1)
    ax.text(1, 0.42, "boundary shifts", fontsize=8)
    ax.axvspan(figures["rebuild_started_s"], figures["rebuild_ended_s"], color="tab:green",
               alpha=0.08, label="batch rebuild running")
    ax.set_xlabel("seconds after the shift")
    ax.set_ylabel(f"rolling accuracy ({args.window_s:.0f} s window)")
    ax.set_ylim(0.4, 1.0)
    ax.set_title(f"Drift recovery: {args.rate:.0f} events/s, half labelled")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot)
    say(f"plot saved to {args.plot}")


if __name__ == "__main__":
    sys.exit(main())

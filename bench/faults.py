"""Fault campaign: what Stratum loses when a worker, a broker or S3 fails mid-stream.

Starts its own replicated topology on free loopback ports: three Kafka brokers on one
ZooKeeper (every topic and changelog replicated 3, ``min.insync.replicas=2``), the S3 server,
and ``--workers`` Faust workers of one group, each with its own port, advertised URL and data
directory, with the lake archive and the speed layer on. A steady labelled feed runs for the
whole campaign (an idempotent ``acks=all`` producer, ``--rate`` events/s), and at random
moments the campaign injects, ``--repeats`` times each, in a shuffled order:

* ``kill_worker``: ``kill -9`` of a serving worker (not the learner), restarted 5 s later;
* ``kill_learner``: ``kill -9`` of the worker holding the speed layer's learner;
* ``kill_leader_broker``: ``kill -9`` of the broker leading the most input partitions,
  restarted 10 s later;
* ``cluster_restart``: every broker stopped, then all started again;
* ``s3_down_archive``: the S3 server stopped for ``--s3-outage`` seconds while the archive
  flushes every 5 s;
* ``s3_down_batch``: the S3 server stopped for ``--s3-outage`` seconds from the moment a
  batch run (``python -m batch run`` on ``local[1]`` Spark, reading the lake) starts
  publishing to the registry;
* ``announce_during_kill``: a new model version announced while a worker is killed;
* ``freeze_worker``: a worker frozen with SIGSTOP past the group's session timeout
  (``--session-timeout``, the ``WORKER_SESSION_TIMEOUT_S`` of the workers, default 60 s),
  then resumed;
* ``start_two_workers``: two workers stopped (SIGTERM) and started again at the same moment,
  the start-up that once left one worker's first micro-batch unconfirmed: recovery then means
  every partition, including the ones the two new workers took, answered again.

A worker that exits on its own is restarted at once, as a supervisor would, and counted.

For each fault it reports the events sent during it, the predictions that arrived during it,
duplicate predictions (an id answered again), and times from the injection: to the first
prediction of an event sent after it (``first_s``); until every input partition has answered
an event sent after the fault was over (the worker restarted, the broker or S3 back, the
worker resumed: ``all_partitions_s``, the time to recover); until every event sent before
then is answered (``caught_up_s``); and the longest time any input partition went without a
prediction (``longest_gap_s``). At the end the feed stops and it reports,
over the whole campaign: events in, distinct predictions out, lost (events never answered),
duplicates, dead letters, lake rows and distinct lake ids (exactly once: both equal events
in), speed-layer updates and any two with the same ``(base_version, seq)``, and versions going
backwards (a prediction by an older base version after one by a newer base version, per input
partition; the same base with an older speed-layer ``seq`` is counted apart as
``update_seq_backwards``).

    .venv/bin/python bench/faults.py [--rate 400] [--repeats 3] [--workers 3]
                                     [--faults kill_worker,cluster_restart] [--seed 1]

Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import orjson  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from app.settings import Settings  # noqa: E402
from devstack.stack import LocalStack, free_ports  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402
from demo.data import FEATURES, event_messages  # noqa: E402
from models.registry import ModelRef, Registry  # noqa: E402
from devstack.harness import (WorkerProcess, announce, http, publish_small_model,  # noqa: E402
                           run, scratch_dir)

FAULTS = ("kill_worker", "kill_learner", "kill_leader_broker", "cluster_restart",
          "s3_down_archive", "s3_down_batch", "announce_during_kill", "freeze_worker",
          "start_two_workers")
CLASSES = ["b", "s"]


def say(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- the feed ---------------------------------------------------------------------------------

class Feed(threading.Thread):
    """Labelled demo events at a steady rate through an idempotent acks=all producer; records
    when each id was sent and which input partition stored it."""

    def __init__(self, settings: Settings, rate: float) -> None:
        super().__init__(daemon=True, name="feed")
        self.settings = settings
        self.rate = rate
        self.sent_at: dict[str, float] = {}
        self.partition_of: dict[str, int] = {}
        self.failed: list[str] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.settings.bootstrap_servers,
                             "enable.idempotence": True, "acks": "all", "linger.ms": 5,
                             # As Kafka's Java client (and Stratum's producer): an event's
                             # prediction lands in the partition number of the event.
                             "partitioner": "murmur2_random",
                             # Through a whole-cluster restart: wait, never drop.
                             "message.timeout.ms": 600_000})

        def delivered(err: Any, msg: Any) -> None:
            key = msg.key().decode()
            if err is not None:
                self.failed.append(f"{key}: {err}")
            else:
                self.partition_of[key] = msg.partition()

        started = time.monotonic()
        sent = 0
        chunk: list[dict[str, Any]] = []
        while not self._halt.is_set():
            due = int((time.monotonic() - started) * self.rate)
            while sent < due:
                if not chunk:
                    chunk = event_messages(5000, seed=sent, start_id=1_000_000_000 + sent)
                    chunk.reverse()
                message = chunk.pop()
                message["ts"] = int(time.time() * 1000)
                key = message["id"]
                while True:
                    try:
                        producer.produce(self.settings.events_topic, orjson.dumps(message),
                                         key=key.encode(), on_delivery=delivered)
                        break
                    except BufferError:
                        producer.poll(0.05)
                with self._lock:
                    self.sent_at[key] = time.time()
                sent += 1
            producer.poll(0.01)
        remaining = producer.flush(600)
        if remaining:
            self.failed.append(f"{remaining} messages still unsent at the end")

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def sent_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for t in self.sent_at.values() if start <= t < end)


# -- what comes out ---------------------------------------------------------------------------

class Monitor(threading.Thread):
    """Reads predictions, dead letters and the update topic from the start, all along."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True, name="monitor")
        self.settings = settings
        self.arrivals: list[tuple[float, str, int, str]] = []  # (time, id, partition, version)
        self.answered: Counter[str] = Counter()
        self.dead_letters = 0
        self.updates: list[dict[str, Any]] = []  # MODEL-REF and UP messages, in topic order
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        s = self.settings
        consumer = Consumer({"bootstrap.servers": s.bootstrap_servers, "group.id": "faults-mon",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        admin = AdminClient({"bootstrap.servers": s.bootstrap_servers})
        topics = [s.predictions_topic, s.dlq_topic, s.updates_topic]
        meta = admin.list_topics(timeout=30).topics
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                         for t in topics for p in meta[t].partitions])
        try:
            while not self._halt.is_set():
                for msg in consumer.consume(1000, 0.2):
                    if msg.error():
                        continue
                    now = time.time()
                    topic = msg.topic()
                    if topic == s.predictions_topic:
                        value = orjson.loads(msg.value())
                        with self.lock:
                            self.arrivals.append((now, value["id"], msg.partition(),
                                                  value["model_version"]))
                            self.answered[value["id"]] += 1
                    elif topic == s.dlq_topic:
                        self.dead_letters += 1
                    else:
                        try:
                            update = orjson.loads(msg.value())
                        except orjson.JSONDecodeError:
                            continue
                        update.pop("weight", None)
                        update.pop("bias", None)
                        self.updates.append(update)
        finally:
            consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- the workers ------------------------------------------------------------------------------

class Workers:
    """The Faust workers, restarted when they exit on their own (a supervisor's job)."""

    def __init__(self, env: dict[str, str], n: int, work: Path) -> None:
        ports = free_ports(n)
        self.envs = [{**env, "WEB_PORT": str(port), "WEB_BIND": "127.0.0.1",
                      "WEB_ADVERTISED_URL": f"http://127.0.0.1:{port}",
                      "STRATUM_DATA_DIR": str(work / f"worker-{i}")}
                     for i, port in enumerate(ports)]
        self.work = work
        self.procs: list[WorkerProcess | None] = [None] * n
        self.unexpected_exits = 0
        self.starts = 0
        self.managed: set[int] = set()  # workers a fault is handling: not the supervisor's
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="supervisor")

    def start_all(self) -> None:
        for i in range(len(self.procs)):
            self.start(i)
        for proc in self.procs:
            assert proc is not None
            proc.wait_ready(300)
        self._thread.start()

    def start(self, i: int) -> WorkerProcess:
        proc = WorkerProcess(self.envs[i], self.work / f"worker-{i}.log").start()
        self.procs[i] = proc
        self.starts += 1
        return proc

    def kill(self, i: int, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.procs[i]
        assert proc is not None and proc.proc is not None
        os.killpg(proc.proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.proc.wait()

    def learner(self) -> int | None:
        """Which worker reports ``stratum_speed_learner 1``."""
        for i, proc in enumerate(self.procs):
            if proc is None:
                continue
            try:
                status, body, _ = http("GET", f"{proc.url}/metrics")
            except OSError:
                continue
            if status == 200 and re.search(r"^stratum_speed_learner 1", str(body), re.M):
                return i
        return None

    def versions(self) -> list[str | None]:
        out: list[str | None] = []
        for proc in self.procs:
            try:
                status, body, _ = http("GET", f"{proc.url}/ready") if proc else (0, None, "")
                out.append(body.get("model_version") if status == 200 else None)
            except (OSError, AttributeError):
                out.append(None)
        return out

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            with self.lock:
                for i, proc in enumerate(self.procs):
                    if i in self.managed or proc is None or proc.proc is None:
                        continue
                    if proc.proc.poll() is not None:
                        self.unexpected_exits += 1
                        say(f"worker {i} exited with {proc.proc.returncode}; restarting it:\n"
                            f"{proc.log_tail(15)}")
                        self.start(i)

    def stop_all(self) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc is not None and proc.proc is not None:
                with_cont = proc.proc.poll() is None
                if with_cont:
                    os.killpg(proc.proc.pid, signal.SIGCONT)
                proc.stop()


# -- the campaign -----------------------------------------------------------------------------

class Campaign:
    def __init__(self, args: argparse.Namespace, stack: LocalStack, settings: Settings,
                 env: dict[str, str], workers: Workers, feed: Feed, monitor: Monitor,
                 candidates: list[ModelRef], work: Path) -> None:
        self.args = args
        self.stack = stack
        self.settings = settings
        self.env = env
        self.workers = workers
        self.feed = feed
        self.monitor = monitor
        self.candidates = candidates
        self.work = work
        self.rng = random.Random(args.seed)
        self.records: list[dict[str, Any]] = []
        self.batch_runs: list[dict[str, Any]] = []

    # Each fault returns extra figures for its record.

    def kill_worker(self, learner: bool = False) -> dict[str, Any]:
        chosen = self.workers.learner() if learner else None
        if chosen is None:
            others = [i for i in range(len(self.workers.procs)) if i != self.workers.learner()]
            chosen = self.rng.choice(others)
        with self.workers.lock:
            self.workers.managed.add(chosen)
            self.workers.kill(chosen)
        time.sleep(5)
        with self.workers.lock:
            self.workers.start(chosen)
            self.workers.managed.discard(chosen)
        return {"worker": chosen}

    def kill_learner(self) -> dict[str, Any]:
        found = self.workers.learner()
        figures = self.kill_worker(learner=True)
        figures["was_learner"] = found == figures["worker"]
        return figures

    def kill_leader_broker(self) -> dict[str, Any]:
        admin = AdminClient({"bootstrap.servers": self.settings.bootstrap_servers})
        meta = admin.list_topics(self.settings.events_topic, timeout=30)
        leaders = Counter(p.leader for p in meta.topics[self.settings.events_topic]
                          .partitions.values())
        victim = leaders.most_common(1)[0][0]
        self.stack.kill_broker(victim, signal.SIGKILL)
        time.sleep(10)
        began = time.time()
        self.stack.start_broker(victim)
        return {"broker": victim, "led_partitions": leaders[victim],
                "restart_s": round(time.time() - began, 1)}

    def cluster_restart(self) -> dict[str, Any]:
        began = time.time()
        for broker_id in range(self.stack.brokers):
            self.stack.kill_broker(broker_id, signal.SIGTERM)
        down = time.time()
        for broker_id in range(self.stack.brokers):
            self.stack.start_broker(broker_id)
        return {"stop_s": round(down - began, 1), "start_s": round(time.time() - down, 1)}

    def s3_down_archive(self) -> dict[str, Any]:
        self.stack.stop_s3()
        time.sleep(self.args.s3_outage)
        self.stack.start_s3()
        return {"outage_s": self.args.s3_outage}

    def s3_down_batch(self) -> dict[str, Any]:
        env = {**os.environ, **self.env, "BATCH_EPOCHS": "1", "BATCH_HIDDEN": "16",
               "BATCH_COMPARE_ACTIVE": "0", "BATCH_THREADS": "1", "SPARK_MASTER": "local[1]",
               "BATCH_LOCK_TTL_S": "60"}
        log_path = self.work / f"batch-{len(self.batch_runs)}.log"
        refs_before = self._model_refs()
        began = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "batch", "run"], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        # The outage begins when the run starts publishing (or, if it never gets there, when
        # it ends): the registry write and the announcement meet a dead S3.
        while proc.poll() is None and time.time() - began < self.args.batch_timeout:
            if "] publish ..." in log_path.read_text(errors="replace"):
                break
            time.sleep(0.1)
        outage_at = round(time.time() - began, 1)
        self.stack.stop_s3()
        time.sleep(self.args.s3_outage)
        self.stack.start_s3()
        try:
            code = proc.wait(self.args.batch_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        new_refs = self._model_refs()[len(refs_before):]
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        figures = {"outage_at_s": outage_at, "batch_exit": code,
                   "batch_s": round(time.time() - began, 1),
                   "announced": [r["version"] for r in new_refs], "batch_last_line": tail[0]}
        self.batch_runs.append(figures)
        return figures

    def announce_during_kill(self) -> dict[str, Any]:
        ref = self.candidates.pop(0)
        chosen = self.rng.randrange(len(self.workers.procs))
        announcer = threading.Thread(target=lambda: run(announce(
            self.settings.bootstrap_servers, self.settings.updates_topic, ref.to_message())))
        with self.workers.lock:
            self.workers.managed.add(chosen)
            announcer.start()
            self.workers.kill(chosen)
        announced = time.time()
        announcer.join()
        time.sleep(5)
        with self.workers.lock:
            self.workers.start(chosen)
            self.workers.managed.discard(chosen)

        def converged() -> dict[str, Any]:
            """Every worker ends up serving the announced version (or an update of it)."""
            deadline = time.time() + 180
            while time.time() < deadline:
                versions = self.workers.versions()
                if all(v is not None and v.split("+")[0] == ref.version for v in versions):
                    return {"all_workers_swapped_s": round(time.time() - announced, 1)}
                time.sleep(0.5)
            return {"all_workers_swapped_s": None}

        return {"worker": chosen, "version": ref.version, "_after": converged}

    def freeze_worker(self) -> dict[str, Any]:
        chosen = self.rng.randrange(len(self.workers.procs))
        frozen_s = self.args.session_timeout + self.args.freeze_extra
        with self.workers.lock:
            self.workers.managed.add(chosen)
            self.workers.kill(chosen, signal.SIGSTOP)
        time.sleep(frozen_s)
        with self.workers.lock:
            self.workers.kill(chosen, signal.SIGCONT)
            self.workers.managed.discard(chosen)
        return {"worker": chosen, "frozen_s": frozen_s}

    def start_two_workers(self) -> dict[str, Any]:
        chosen = self.rng.sample(range(len(self.workers.procs)), 2)
        with self.workers.lock:
            self.workers.managed.update(chosen)
        codes = []
        for i in chosen:
            proc = self.workers.procs[i]
            assert proc is not None
            codes.append(proc.stop())
        with self.workers.lock:
            for i in chosen:
                self.workers.start(i)
            self.workers.managed.difference_update(chosen)
        return {"workers": chosen, "stop_exit_codes": codes}

    def _model_refs(self) -> list[dict[str, Any]]:
        return [u for u in list(self.monitor.updates) if u.get("type") == "MODEL-REF"]

    # Recovery: every input partition answers events sent after the fault, and everything
    # sent until then is answered.

    def wait_recovered(self, began: float, ended: float, timeout: float
                       ) -> tuple[float | None, float | None, float | None]:
        """Seconds from ``began`` (the injection) to: the first prediction of an event sent
        after it; every input partition answering an event sent after ``ended`` (the fault
        over); and every event sent before ``ended`` answered (``None``: not within
        ``timeout``)."""
        partitions = self.settings.topic_partitions
        deadline = time.time() + timeout
        with self.feed._lock:
            pending = {i for i, t in self.feed.sent_at.items() if t >= began - 60 and t < ended}
        seen = 0
        first: float | None = None
        answered_at: dict[int, float] = {}
        caught_up: float | None = None
        while time.time() < deadline:
            with self.monitor.lock:
                fresh = self.monitor.arrivals[seen:]
                seen = len(self.monitor.arrivals)
            for arrived, event_id, _, _ in fresh:
                pending.discard(event_id)
                sent = self.feed.sent_at.get(event_id)
                part = self.feed.partition_of.get(event_id)
                if sent is None or sent < began or part is None:
                    continue
                first = arrived if first is None else min(first, arrived)
                if sent >= ended:
                    answered_at.setdefault(part, arrived)
            if caught_up is None and not pending:
                caught_up = time.time()
            if len(answered_at) == partitions and caught_up is not None:
                break
            time.sleep(0.2)

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - began, 2)

        all_at = max(answered_at.values()) if len(answered_at) == partitions else None
        return since(first), since(all_at), since(caught_up)

    def inject(self, kind: str) -> None:
        pause = self.rng.uniform(self.args.pause_min, self.args.pause_max)
        time.sleep(pause)
        with self.monitor.lock:
            arrivals_before = len(self.monitor.arrivals)
        began = time.time()
        say(f"{kind} (after {pause:.0f}s of steady feed; load {load()})")
        action: Callable[[], dict[str, Any]] = getattr(self, kind)
        figures = action()
        injected_for = time.time() - began
        first_s, all_s, caught_up_s = self.wait_recovered(began, time.time(),
                                                          timeout=300)
        after = figures.pop("_after", None)
        if after is not None:
            figures.update(after())
        ended = time.time()
        with self.monitor.lock:
            during = self.monitor.arrivals[arrivals_before:]
            earlier = Counter(a[1] for a in self.monitor.arrivals[:arrivals_before])
        seen: Counter[str] = Counter()
        duplicates = 0
        for _, event_id, _, _ in during:
            if earlier[event_id] or seen[event_id]:
                duplicates += 1
            seen[event_id] += 1
        last_at: dict[int, float] = {}
        longest_gap = 0.0
        for arrived, event_id, partition, _ in during:
            part = self.feed.partition_of.get(event_id, partition)
            longest_gap = max(longest_gap, arrived - last_at.get(part, began))
            last_at[part] = arrived
        record = {"fault": kind, "at": round(began, 1), "fault_s": round(injected_for, 1),
                  "first_s": first_s, "all_partitions_s": all_s, "caught_up_s": caught_up_s,
                  "longest_gap_s": round(longest_gap, 2),
                  "events_sent": self.feed.sent_between(began, ended),
                  "predictions": len(during), "duplicates": duplicates, **figures}
        say(json.dumps(record))
        self.records.append(record)


# -- figures at the end -----------------------------------------------------------------------

def lake_ids(settings: Settings) -> tuple[int, int]:
    """(rows, distinct ids) of the lake."""
    import pyarrow.dataset as ds

    from models.storage import filesystem

    fs, path = filesystem(settings.lake_uri, settings.storage_options)
    try:
        dataset = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
        ids = dataset.to_table(columns=["id"]).column("id")
    except (FileNotFoundError, ValueError):
        return 0, 0
    import pyarrow.compute as pc

    return len(ids), len(pc.unique(ids))


def backwards(monitor: Monitor, feed: Feed) -> tuple[int, int, int]:
    """(predictions by an older base after a newer base, predictions by an older update of
    the same base after a newer one, predictions whose partition differs from their event's),
    per input partition in the order the predictions were stored."""
    order: dict[str, int] = {}
    for update in monitor.updates:
        if update.get("type") == "MODEL-REF":
            order.setdefault(update["version"], len(order))
    base_back = seq_back = moved = 0
    newest: dict[int, tuple[int, int]] = {}
    for _, event_id, partition, version in monitor.arrivals:
        input_partition = feed.partition_of.get(event_id, partition)
        if input_partition != partition:
            moved += 1
        base, _, seq = version.partition("+")
        rank = (order.get(base, -1), int(seq or 0))
        best = newest.get(input_partition)
        if best is not None:
            if rank[0] < best[0]:
                base_back += 1
                continue
            if rank[0] == best[0] and rank[1] < best[1]:
                seq_back += 1
                continue
        newest[input_partition] = rank
    return base_back, seq_back, moved


def seq_figures(monitor: Monitor) -> dict[str, Any]:
    ups = [u for u in monitor.updates if u.get("type") == "UP"]
    by_key: dict[tuple[str, int], set[str]] = defaultdict(set)
    for u in ups:
        by_key[(u["base_version"], u["seq"])].add(u.get("sha256", ""))
    repeated = sum(1 for shas in by_key.values() if len(shas) > 1)
    resent = sum(1 for u in ups) - len(by_key)
    gaps = 0
    per_base: dict[str, list[int]] = defaultdict(list)
    for base, seq in by_key:
        per_base[base].append(seq)
    for seqs in per_base.values():
        seqs.sort()
        gaps += sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
    return {"updates": len(ups), "duplicate_seq": repeated, "same_update_resent": resent,
            "seq_gaps": gaps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=400.0, help="events per second")
    parser.add_argument("--repeats", type=int, default=3, help="times each fault is injected")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated subset of {','.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pause-min", type=float, default=5.0,
                        help="least seconds of steady feed before a fault")
    parser.add_argument("--pause-max", type=float, default=20.0)
    parser.add_argument("--s3-outage", type=float, default=60.0)
    parser.add_argument("--session-timeout", type=float, default=60.0,
                        help="the workers' WORKER_SESSION_TIMEOUT_S (default %(default)s)")
    parser.add_argument("--freeze-extra", type=float, default=15.0,
                        help="seconds a frozen worker stays frozen past the session timeout")
    parser.add_argument("--batch-timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    args = parser.parse_args()
    kinds = [k for k in args.faults.split(",") if k]
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {sorted(unknown)}")
    schedule = [k for k in kinds for _ in range(args.repeats)]
    random.Random(args.seed).shuffle(schedule)
    say(f"load before: {load()}; schedule: {schedule}")
    began = time.time()
    with scratch_dir("stratum-faults-", args.keep) as work, \
            LocalStack(data_dir=work / "stack", brokers=3, s3_buckets=["faults"]) as stack:
        env = {**stack.environment("faults"), "STRATUM_APP_ID": "faults",
               "LAKE_URI": "s3://faults/lake/events", "TOPIC_REPLICATION_FACTOR": "3",
               "TOPIC_MIN_INSYNC_REPLICAS": "2", "TOPIC_PARTITIONS": str(args.partitions),
               "ARCHIVE_FLUSH_S": "5", "SPEED_WINDOW_S": "5", "SPEED_MIN_EXAMPLES": "50",
               "TORCH_THREADS": "1", "WORKER_SESSION_TIMEOUT_S": str(args.session_timeout),
               # Workers and batch runs import this checkout's code, whatever is installed.
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        settings = Settings.from_env(env)
        registry = Registry(settings.registry_uri, settings.storage_options)
        ref = publish_small_model(registry, settings.model_name, FEATURES, CLASSES)
        candidates = [publish_small_model(registry, settings.model_name, FEATURES, CLASSES,
                                          seed=1 + i) for i in range(args.repeats)]
        run(ensure_topics(settings))
        run(announce(settings.bootstrap_servers, settings.updates_topic, ref.to_message()))
        workers = Workers(env, args.workers, work)
        workers.start_all()
        say(f"{args.workers} workers ready; feeding {args.rate:.0f} events/s")
        monitor = Monitor(settings)
        monitor.start()
        feed = Feed(settings, args.rate)
        feed.start()
        campaign = Campaign(args, stack, settings, env, workers, feed, monitor, candidates,
                            work)
        try:
            for kind in schedule:
                campaign.inject(kind)
            time.sleep(args.pause_max)
        finally:
            feed.stop()
        sent = set(feed.sent_at)
        say(f"feed stopped after {len(sent)} events; waiting for every prediction")
        deadline = time.time() + 300
        while time.time() < deadline and not sent <= set(monitor.answered):
            time.sleep(1)
        # Every event is archived within ARCHIVE_FLUSH_S of being read; allow for retries.
        lake = (0, 0)
        deadline = time.time() + 180
        while time.time() < deadline:
            lake = lake_ids(settings)
            if lake[1] >= len(sent):
                break
            time.sleep(5)
        load_after = load()
        workers.stop_all()
        monitor.stop()
        answered = set(monitor.answered)
        base_back, seq_back, moved = backwards(monitor, feed)
        per_fault: dict[str, Any] = {}
        for kind in kinds:
            rs = [r for r in campaign.records if r["fault"] == kind]
            recov = [r["all_partitions_s"] for r in rs if r["all_partitions_s"] is not None]
            per_fault[kind] = {
                "runs": len(rs), "duplicates": sum(r["duplicates"] for r in rs),
                "recover_all_partitions_s": recov,
                "caught_up_s": [r["caught_up_s"] for r in rs],
                "first_prediction_s": [r["first_s"] for r in rs],
                "longest_gap_s": [r["longest_gap_s"] for r in rs],
                "not_recovered": sum(1 for r in rs if r["all_partitions_s"] is None)}
        figures = {
            "events_in": len(sent), "producer_failures": len(feed.failed),
            "predicted_distinct": len(answered & sent),
            "lost": len(sent - answered), "predictions": sum(monitor.answered.values()),
            "duplicates": sum(monitor.answered.values()) - len(answered),
            "unknown_ids_answered": len(answered - sent),
            "dead_letters": monitor.dead_letters,
            "lake_rows": lake[0], "lake_distinct_ids": lake[1],
            "lake_exactly_once": lake[0] == lake[1] == len(sent),
            "versions_backwards": base_back, "update_seq_backwards": seq_back,
            "prediction_partition_differs": moved,
            **seq_figures(monitor),
            "worker_unexpected_exits": workers.unexpected_exits,
            "worker_starts": workers.starts,
            "batch_runs": campaign.batch_runs,
            "per_fault": per_fault, "faults": campaign.records,
            "rate": args.rate, "session_timeout_s": args.session_timeout,
            "workers": args.workers, "partitions": args.partitions,
            "brokers": 3, "seconds": round(time.time() - began),
            "load_after": load_after, "cpus": os.cpu_count(),
        }
    print(json.dumps(figures), flush=True)
    return 0 if figures["lost"] == 0 and figures["versions_backwards"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

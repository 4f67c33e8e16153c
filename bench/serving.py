"""Serving throughput and latency: Stratum beside the loops a user would write instead.

Starts its own Kafka + S3 on free ports, publishes a model of the default architecture
(30-500-1000-500-2 on the Higgs-schema features), writes one backlog of demo events (half of
them labelled, a few malformed) and, one after another on that same backlog and broker,
measures:

* ``raw``: ``predict_proba`` alone at the worker's micro-batch size and thread count;
* ``stratum``: one worker (``faust -A app worker``) with everything on: tables, the lake
  archive and the speed layer;
* ``stratum_lean``: the same with the archive and the speed layer off;
* ``batched``: the plain batched aiokafka loop of ``bench/peers.py``;
* ``naive``: the per-event aiokafka loop of ``bench/peers.py`` (on the first
  ``--naive-events`` of the backlog: it is slow);

each as events answered per second (predictions and dead letters, from the first answer to
the last, by the broker's timestamps), its process's CPU per event and the broker's CPU per
event over the same span. Then a fresh worker (everything on) gets a live feed at half of
Stratum's sustained rate for ``--latency-seconds``, and the time from each event's send to its
prediction's arrival gives p50/p99 latency.

    .venv/bin/python bench/serving.py [--events 200000] [--batch-size 512]

``--soak MINUTES`` instead feeds half the sustained rate (``--rate``, else measured first) for
that long, reports the worker's RSS every minute and the lost and duplicated predictions at
the end, then stops the whole stack for longer than ``LATEST_RETENTION_S`` and starts it
again, ``--restarts`` times, reporting how long the worker took to be ready each time.

Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from app.settings import Settings  # noqa: E402
from devstack.stack import LocalStack, free_port, free_ports  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402
from demo.data import FEATURES, event_messages  # noqa: E402
from models.registry import ModelRef, Registry  # noqa: E402
from devstack.harness import (PacedFeed, WorkerProcess, announce, produce_waiting,  # noqa: E402
                              publish_small_model, scratch_dir)

BENCH = Path(__file__).resolve().parent
MALFORMED_EVERY = 1000


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- measuring a process ----------------------------------------------------------------------

def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) and, unless
    ``children`` is False, of its live descendants (the speed layer's learning process)."""
    total = 0.0
    for p in [pid, *(descendants(pid) if children else [])]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dir_mib(path: Path) -> float:
    """Size of the files under ``path``, in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- topics -----------------------------------------------------------------------------------

def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], tuple[int, int]]:
    """``(topic, partition) -> (first offset, end offset)`` of every partition of ``topics``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-offsets"})
    try:
        out = {}
        metadata = consumer.list_topics(timeout=10)
        for topic in topics:
            for partition in metadata.topics[topic].partitions:
                out[(topic, partition)] = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=10)
        return out
    finally:
        consumer.close()


def count(bootstrap: str, topics: list[str]) -> int:
    return sum(end - first for first, end in end_offsets(bootstrap, topics).values())


def time_span(bootstrap: str, topics: list[str]) -> tuple[float, float]:
    """Broker timestamps (s) of the first and the last message on ``topics``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-span",
                         "enable.auto.commit": False})
    firsts, lasts = [], []
    try:
        for (topic, partition), (first, end) in end_offsets(bootstrap, topics).items():
            if end <= first:
                continue
            for offset, into in ((first, firsts), (end - 1, lasts)):
                consumer.assign([TopicPartition(topic, partition, offset)])
                message = None
                while message is None or message.error():
                    message = consumer.poll(10)
                into.append(message.timestamp()[1] / 1000)
        return min(firsts), max(lasts)
    finally:
        consumer.close()


def produce_backlog(bootstrap: str, topic: str, n: int) -> float:
    """``n`` demo events (one in MALFORMED_EVERY malformed); return the producer's rate."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "partitioner": "murmur2_random"})
    started = time.perf_counter()
    for start in range(0, n, 10_000):
        for k, event in enumerate(event_messages(min(10_000, n - start), seed=start,
                                                 start_id=start)):
            value = orjson.dumps(event)
            if (start + k) % MALFORMED_EVERY == MALFORMED_EVERY - 1:
                value = value[:-2]  # cut short: not JSON
            produce_waiting(producer, topic, value, event["id"].encode())
    assert producer.flush(120) == 0
    return n / (time.perf_counter() - started)


# -- the contenders ---------------------------------------------------------------------------

class Deployment:
    """One contender's names: its own group, output topics and worker settings."""

    def __init__(self, stack: LocalStack, work: Path, name: str, input_topic: str,
                 partitions: int, extra: dict[str, str]) -> None:
        self.name = name
        self.env = {**stack.environment("bench"), "STRATUM_APP_ID": f"bench-{name}",
                    "WEB_PORT": str(free_port()), "STRATUM_DATA_DIR": str(work / name),
                    "EVENTS_TOPIC": input_topic, "PREDICTIONS_TOPIC": f"{name}-predictions",
                    "DLQ_TOPIC": f"{name}-dlq", "UPDATES_TOPIC": "bench-model-updates",
                    "METRICS_TOPIC": f"{name}-metrics", "TOPIC_PARTITIONS": str(partitions),
                    "LAKE_URI": f"s3://bench/lake/{name}", **extra}
        self.settings = Settings.from_env(self.env)
        self.outputs = [self.settings.predictions_topic, self.settings.dlq_topic]


def measure(name: str, bootstrap: str, outputs: list[str], expected: int, pid: int,
            broker_pid: int, alive: Callable[[], None], timeout: float = 900) -> dict[str, Any]:
    """Wait for ``expected`` answers on ``outputs``; CPU per event of ``pid`` and the
    broker from the first answer to the last."""
    deadline = time.monotonic() + timeout
    while count(bootstrap, outputs) == 0:
        alive()
        assert time.monotonic() < deadline, f"{name}: no answer"
        time.sleep(0.05)
    cpu0, broker0, answered0 = cpu_seconds(pid), cpu_seconds(broker_pid), count(bootstrap,
                                                                                outputs)
    last_report = time.monotonic()
    while (answered := count(bootstrap, outputs)) < expected:
        alive()
        assert time.monotonic() < deadline, f"{name}: {answered} of {expected} answered"
        if time.monotonic() - last_report > 10:
            say(f"  {name}: {answered} of {expected} answered")
            last_report = time.monotonic()
        time.sleep(0.05)
    cpu, broker = cpu_seconds(pid) - cpu0, cpu_seconds(broker_pid) - broker0
    first, last = time_span(bootstrap, outputs)
    events = answered - answered0
    figures = {"answered": answered, "per_s": round(answered / (last - first)),
               "cpu_us_per_event": round(1e6 * cpu / events, 1),
               "broker_cpu_us_per_event": round(1e6 * broker / events, 1)}
    say(f"{name}: {figures['per_s']} events/s; {figures['cpu_us_per_event']} us CPU per event "
        f"(broker {figures['broker_cpu_us_per_event']} us); load {load()}")
    return figures


def run_stratum(d: Deployment, stack: LocalStack, work: Path, expected: int) -> dict[str, Any]:
    asyncio.run(ensure_topics(d.settings))
    worker = WorkerProcess(d.env, work / f"{d.name}.log").start()
    try:
        worker.wait_ready(timeout=180)
        figures = measure(d.name, stack.bootstrap, d.outputs, expected, worker.proc.pid,
                          stack.pids["kafka"], worker._check_alive)
        figures["rss_mib"] = round(rss_mib(worker.proc.pid))
    finally:
        worker.stop()
    return figures


def run_peer(kind: str, d: Deployment, stack: LocalStack, work: Path, ref: ModelRef,
             expected: int, batch_size: int, threads: int) -> dict[str, Any]:
    asyncio.run(ensure_topics(d.settings))
    log = open(work / f"{d.name}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(BENCH / "peers.py"), kind, "--input", d.settings.events_topic,
         "--output", d.settings.predictions_topic, "--dlq", d.settings.dlq_topic,
         "--group", d.settings.app_id, "--manifest", ref.manifest_uri, "--sha256", ref.sha256,
         "--count", str(expected), "--batch-size", str(batch_size),
         "--threads", str(threads)],
        env={**os.environ, **d.env}, stdout=log, stderr=subprocess.STDOUT)

    def alive() -> None:
        if proc.poll() not in (None, 0):
            raise RuntimeError(f"{kind} exited with {proc.returncode}: "
                               f"{(work / f'{d.name}.log').read_text()[-2000:]}")
    try:
        return measure(d.name, stack.bootstrap, d.outputs, expected, proc.pid,
                       stack.pids["kafka"], alive)
    finally:
        proc.kill()
        proc.wait()
        log.close()


def raw_inference(model: Any, batch_size: int, threads: int, seconds: float = 5.0) -> float:
    """Samples/s of ``predict_proba`` on demo rows at ``batch_size`` with ``threads``."""
    torch.set_num_threads(threads)
    rows = np.array([[m["features"][f] for f in FEATURES]
                     for m in event_messages(batch_size, seed=7)], dtype=np.float64)
    model.predict_proba(rows)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict_proba(rows)
        done += batch_size
    rate = done / (time.perf_counter() - started)
    say(f"raw inference at batch {batch_size}, {threads} thread(s): {rate:.0f} samples/s")
    return rate


# -- a live feed ------------------------------------------------------------------------------

class Feed(PacedFeed):
    """Events at a steady rate from a thread; ids ``<prefix>-<n>-<send time ms>`` (the send
    time is before the producer's linger, so its wait counts in the latency)."""

    def __init__(self, bootstrap: str, topic: str, rate: float, prefix: str) -> None:
        super().__init__(bootstrap, topic, rate)
        self.prefix = prefix
        pool = event_messages(1000, seed=11)
        self.bodies = [orjson.dumps({k: v for k, v in m.items() if k != "id"})[1:]
                       for m in pool]

    def message(self, n: int) -> tuple[bytes, bytes]:
        key = f"{self.prefix}-{n}-{int(time.time() * 1000)}".encode()
        return key, b'{"id":"' + key + b'",' + self.bodies[n % len(self.bodies)]


def create_topic(bootstrap: str, name: str, partitions: int,
                 config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1,
                                                config=config or {})]).values():
        future.result(timeout=30)


def read_topic(bootstrap: str, topic: str) -> Iterator[Any]:
    """Every message of ``topic``, from each partition's first offset to its end now."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}",
                         "enable.auto.commit": False})
    ends = end_offsets(bootstrap, [topic])
    consumer.assign([TopicPartition(t, p, first) for (t, p), (first, _) in ends.items()])
    remaining = {p: end - first for (_, p), (first, end) in ends.items()}
    try:
        while any(remaining.values()):
            for message in consumer.consume(10_000, 1.0):
                if message.error():
                    continue
                remaining[message.partition()] -= 1
                yield message
    finally:
        consumer.close()


class Scan:
    """Every prediction of a topic, read after the fact: which ids were answered how often,
    and each one's latency, the broker's append time of the prediction (the topic stamps
    LogAppendTime) minus the send time in the id; no consumer competes with the worker while
    it is measured."""

    def __init__(self, bootstrap: str, topic: str, capacity: int) -> None:
        self.seen = np.zeros(capacity, dtype=np.uint8)
        sent, latency, scored = [], [], []
        for message in read_topic(bootstrap, topic):
            _, n, sent_ms = message.key().decode().rsplit("-", 2)
            self.seen[int(n)] = min(self.seen[int(n)] + 1, 255)
            sent.append(int(sent_ms))
            latency.append(message.timestamp()[1] - int(sent_ms))
            scored.append(orjson.loads(message.value())["ts"] - int(sent_ms))
        self.sent_ms = np.array(sent)
        self.latencies_ms = np.array(latency)
        self.until_scored_ms = np.array(scored)

    def lost_and_duplicated(self, sent: int) -> tuple[int, int]:
        seen = self.seen[:sent]
        return int((seen == 0).sum()), int((seen > 1).sum())


def latency_run(stack: LocalStack, work: Path, partitions: int, rate: float,
                seconds: float, warmup: float, extra: dict[str, str]) -> dict[str, Any]:
    """Feed ``rate`` events/s for ``warmup`` + ``seconds``; latency of the last ``seconds``."""
    d = Deployment(stack, work, "latency", "latency-events", partitions, extra)
    create_topic(stack.bootstrap, d.settings.predictions_topic, partitions,
                 {"message.timestamp.type": "LogAppendTime"})
    asyncio.run(ensure_topics(d.settings))
    worker = WorkerProcess(d.env, work / "latency.log").start()
    try:
        worker.wait_ready(timeout=180)
        total = warmup + seconds
        say(f"latency: feeding {rate:.0f} events/s for {warmup:.0f} s of warm-up and "
            f"{seconds:.0f} s measured")
        feed = Feed(stack.bootstrap, d.settings.events_topic, rate, "lat").start()
        started_ms = time.time() * 1000
        time.sleep(warmup)  # the feed runs for this long: the measurement itself
        pids = {"worker": worker.proc.pid, "broker": stack.pids["kafka"], "bench": os.getpid()}
        cpu0 = {k: cpu_seconds(p, k != "bench") for k, p in pids.items()}
        sent0 = feed.sent
        time.sleep(seconds)
        cpu = {k: cpu_seconds(p, k != "bench") - cpu0[k] for k, p in pids.items()}
        measured = feed.sent - sent0
        sent = feed.stop()
        deadline = time.monotonic() + 60
        while count(stack.bootstrap, [d.settings.predictions_topic]) < sent and \
                time.monotonic() < deadline:
            worker._check_alive()
            time.sleep(0.1)
    finally:
        worker.stop()
    scan = Scan(stack.bootstrap, d.settings.predictions_topic, sent + 1000)
    lost, duplicated = scan.lost_and_duplicated(sent)
    sent_ms, latencies, scored = scan.sent_ms, scan.latencies_ms, scan.until_scored_ms
    steady = sent_ms >= started_ms + warmup * 1000
    windows = []
    for start in np.arange(started_ms + warmup * 1000, started_ms + total * 1000, 5000):
        inside = latencies[(sent_ms >= start) & (sent_ms < start + 5000)]
        if len(inside):
            windows.append(round(float(np.percentile(inside, 99)), 1))
    figures = {"rate": round(rate), "sent": sent, "lost": lost, "duplicated": duplicated,
               "measured_s": seconds, "warmup_s": warmup,
               "p50_ms": round(float(np.percentile(latencies[steady], 50)), 1),
               "p99_ms": round(float(np.percentile(latencies[steady], 99)), 1),
               "max_ms": round(float(latencies[steady].max()), 1),
               # Send to the prediction built (its ts): the rest is the broker storing it.
               "p50_until_scored_ms": round(float(np.percentile(scored[steady], 50)), 1),
               "p99_until_scored_ms": round(float(np.percentile(scored[steady], 99)), 1),
               "p99_ms_per_5s": windows,
               # CPU per event while measured: worker (and its learning process), broker,
               # and this process (the feed).
               "cpu_us_per_event": {k: round(1e6 * v / measured, 1) for k, v in cpu.items()},
               "warmup_p99_ms": round(float(np.percentile(latencies[~steady], 99)), 1)}
    say(f"latency at {rate:.0f} events/s: p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} "
        f"ms, max {figures['max_ms']} ms; {lost} lost, {duplicated} duplicated; p99 per 5 s "
        f"{windows}; during warm-up p99 {figures['warmup_p99_ms']} ms; CPU us per event "
        f"{figures['cpu_us_per_event']}")
    return figures


# -- the main run ------------------------------------------------------------------------------

def publish(stack: LocalStack) -> tuple[Registry, ModelRef]:
    settings = Settings.from_env({**stack.environment("bench"),
                                  "UPDATES_TOPIC": "bench-model-updates"})
    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = publish_small_model(registry, settings.model_name, list(FEATURES), ["b", "s"],
                              hidden=(500, 1000, 500))
    asyncio.run(ensure_topics(settings, [settings.updates_topic]))
    asyncio.run(announce(settings.bootstrap_servers, settings.updates_topic,
                         ref.to_message()))
    say(f"published {ref.version} (30-500-1000-500-2)")
    return registry, ref


def throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    say(f"starting Kafka + S3 on free ports (data in {work}); load {load()}")
    figures: dict[str, Any] = {"events": args.events, "batch_size": args.batch_size,
                               "partitions": args.partitions, "torch_threads": args.threads,
                               "load_before": load()}
    overrides = dict(item.split("=", 1) for item in args.set)
    common = {"SERVING_BATCH_SIZE": str(args.batch_size), "TORCH_THREADS": str(args.threads),
              **overrides}
    if overrides:
        figures["settings"] = overrides
    with LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        registry, ref = publish(stack)
        input_topic = "bench-events"
        asyncio.run(ensure_topics(Deployment(stack, work, "input", input_topic,
                                             args.partitions, {}).settings))
        rate = produce_backlog(stack.bootstrap, input_topic, args.events)
        say(f"backlog of {args.events} events written at {rate:.0f}/s")
        model = registry.load(ref.manifest_uri, ref.sha256)
        runs = args.only.split(",")
        if "raw" in runs:
            figures["raw"] = {"per_s": round(raw_inference(model, args.batch_size,
                                                           args.threads))}
        for name, extra in (("stratum", {"ARCHIVE": "1", "SPEED_LAYER": "1"}),
                            ("stratum_lean", {"ARCHIVE": "0", "SPEED_LAYER": "0"})):
            if name in runs:
                d = Deployment(stack, work, name, input_topic, args.partitions,
                               {**extra, **common})
                figures[name] = run_stratum(d, stack, work, args.events)
        for kind, n in (("batched", args.events), ("naive", args.naive_events)):
            if kind in runs:
                d = Deployment(stack, work, kind, input_topic, args.partitions, common)
                figures[kind] = run_peer(kind, d, stack, work, ref, n, args.batch_size,
                                         args.threads)
        if "latency" in runs and ("stratum" in figures or args.latency_rate):
            figures["latency"] = latency_run(
                stack, work, args.partitions,
                args.latency_rate or figures["stratum"]["per_s"] / 2,
                args.latency_seconds, args.warmup_seconds,
                {"ARCHIVE": "1", "SPEED_LAYER": "1", **common})
    figures["load_after"] = load()
    figures["ratios"] = ratios(figures)
    for key, value in figures["ratios"].items():
        say(f"{key}: {value}")
    return figures


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    out = {}
    for a, b in (("stratum", "raw"), ("stratum", "naive"), ("stratum", "batched"),
                 ("stratum_lean", "raw"), ("stratum_lean", "batched"), ("batched", "raw"),
                 ("naive", "raw")):
        if a in figures and b in figures:
            out[f"{a}/{b}"] = round(figures[a]["per_s"] / figures[b]["per_s"], 3)
    return out


# -- the soak ---------------------------------------------------------------------------------

def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    zk, kafka, s3 = free_ports(3)

    def stack() -> LocalStack:
        return LocalStack(data_dir=work / "stack", zk_port=zk, kafka_port=kafka, s3_port=s3,
                          s3_buckets=["bench"])

    figures: dict[str, Any] = {"minutes": args.soak, "load_before": load()}
    running = stack().start()
    try:
        registry, ref = publish(running)
        extra = {"SERVING_BATCH_SIZE": str(args.batch_size), "TORCH_THREADS": str(args.threads),
                 "ARCHIVE": "1", "SPEED_LAYER": "1"}
        if args.retention:
            extra["LATEST_RETENTION_S"] = str(args.retention)
        d = Deployment(running, work, "soak", "soak-events", args.partitions, extra)
        retention_s = d.settings.latest_retention_s
        create_topic(running.bootstrap, d.settings.predictions_topic, args.partitions,
                     {"message.timestamp.type": "LogAppendTime"})
        asyncio.run(ensure_topics(d.settings))
        rate = args.rate or measure_rate(running, work, args.partitions, extra)
        worker = WorkerProcess(d.env, work / "soak.log").start()
        worker.wait_ready(timeout=180)
        pid = worker.proc.pid
        capacity = int(rate * 60 * args.soak * 1.2) + 10_000
        outputs = [d.settings.predictions_topic]
        feed = Feed(running.bootstrap, d.settings.events_topic, rate, "s").start()
        say(f"soak: {rate:.0f} events/s for {args.soak} min")
        minutes = []
        started = time.monotonic()
        tables = Path(d.env["STRATUM_DATA_DIR"])
        for minute in range(1, args.soak + 1):
            peak = 0.0
            while time.monotonic() - started < 60 * minute:
                worker._check_alive()
                peak = max(peak, rss_mib(pid))
                time.sleep(1)
            row = {"minute": minute, "rss_mib": round(rss_mib(pid)), "peak_rss_mib": round(peak),
                   "sent": feed.sent, "received": count(running.bootstrap, outputs),
                   "store_mib": round(dir_mib(tables)), "load": load()}
            minutes.append(row)
            say(f"  minute {minute}: worker RSS {row['rss_mib']} MiB (peak {row['peak_rss_mib']}), "
                f"{row['sent']} sent, {row['received']} predicted, local store "
                f"{row['store_mib']} MiB; load {row['load']}")
        sent = feed.stop()
        deadline = time.monotonic() + 120
        while count(running.bootstrap, outputs) < sent and time.monotonic() < deadline:
            time.sleep(0.5)
        worker.stop()  # whatever it still had to send is on the topic now: duplicates too
        scan = Scan(running.bootstrap, d.settings.predictions_topic, capacity)
        lost, duplicated = scan.lost_and_duplicated(sent)
        latencies = scan.latencies_ms
        figures.update({
            "rate": round(rate), "sent": sent, "lost": lost, "duplicated": duplicated,
            "rss_mib_by_minute": [m["rss_mib"] for m in minutes],
            "peak_rss_mib_by_minute": [m["peak_rss_mib"] for m in minutes],
            "store_mib_by_minute": [m["store_mib"] for m in minutes],
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1)})
        if len(minutes) >= 5:
            figures["rss_last_over_minute_5"] = round(
                minutes[-1]["rss_mib"] / minutes[4]["rss_mib"], 3)
            figures["peak_rss_last_over_minute_5"] = round(
                minutes[-1]["peak_rss_mib"] / minutes[4]["peak_rss_mib"], 3)
        say(f"soak: {sent} sent, {lost} lost, {duplicated} duplicated; RSS by minute "
            f"{figures['rss_mib_by_minute']}")
        readiness = []
        for k in range(args.restarts):
            running.stop()
            down_s = retention_s + 60
            say(f"restart {k + 1}: stack stopped for {down_s} s (LATEST_RETENTION_S "
                f"{retention_s})")
            time.sleep(down_s)  # the downtime is the scenario, not a wait for an event
            running = stack().start()
            worker = WorkerProcess({**d.env, **running.environment("bench"),
                                    "LAKE_URI": d.env["LAKE_URI"]},
                                   work / f"restart-{k}.log").start()
            begun = time.monotonic()
            worker.wait_ready(timeout=600)
            ready_s = round(time.monotonic() - begun, 1)
            # Serving again: a few new events, each answered and in latest_predictions.
            feed = Feed(running.bootstrap, d.settings.events_topic, 200, f"r{k}").start()
            while feed.sent < 200:
                time.sleep(0.1)
            feed.stop()
            served = wait_for_prediction(worker, "r{k}-199-".format(k=k), running.bootstrap,
                                         d.settings.predictions_topic)
            worker.stop()
            readiness.append({"ready_s": ready_s, "serving": served, "fed": sent})
            say(f"restart {k + 1}: ready after {ready_s} s")
        figures["restarts"] = readiness
    finally:
        running.stop()
    figures["load_after"] = load()
    return figures


def wait_for_prediction(worker: WorkerProcess, prefix: str, bootstrap: str, topic: str,
                        timeout: float = 60) -> bool:
    """Whether a prediction whose id starts with ``prefix`` reaches ``topic`` (read from the
    end of each partition backwards is not possible; the newest 5,000 of each suffice)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-check",
                         "enable.auto.commit": False})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            worker._check_alive()
            tps = [TopicPartition(t, p, max(first, end - 5000)) for (t, p), (first, end)
                   in end_offsets(bootstrap, [topic]).items()]
            consumer.assign(tps)
            for message in consumer.consume(100_000, 2.0):
                if not message.error() and message.key().decode().startswith(prefix):
                    return True
        return False
    finally:
        consumer.close()


def measure_rate(stack: LocalStack, work: Path, partitions: int,
                 extra: dict[str, str]) -> float:
    """Half the sustained rate of one worker with ``extra`` on a 100,000-event backlog."""
    topic = "rate-events"
    d = Deployment(stack, work, "rate", topic, partitions, extra)
    asyncio.run(ensure_topics(d.settings))
    produce_backlog(stack.bootstrap, topic, 100_000)
    sustained = run_stratum(d, stack, work, 100_000)["per_s"]
    return sustained / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--naive-events", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the worker")
    parser.add_argument("--latency-seconds", type=float, default=30.0)
    parser.add_argument("--warmup-seconds", type=float, default=15.0,
                        help="feed before the latency is measured")
    parser.add_argument("--latency-rate", type=float, default=0.0,
                        help="feed rate of the latency run (default: half of stratum's)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a worker setting for every Stratum worker of the run (repeatable)")
    parser.add_argument("--only", default="raw,stratum,stratum_lean,batched,naive,latency",
                        help="comma-separated contenders to run")
    parser.add_argument("--soak", type=int, default=0, metavar="MINUTES")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="soak feed rate (default: half the measured sustained rate)")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--retention", type=int, default=0,
                        help="LATEST_RETENTION_S of the soak worker (default: the setting's)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's data directory (broker logs, worker logs, lake)")
    args = parser.parse_args()
    with scratch_dir("stratum-soak-" if args.soak else "stratum-bench-", args.keep) as work:
        figures = soak(args, work) if args.soak else throughput(args, work)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

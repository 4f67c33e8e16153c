"""Serving throughput: one worker end to end through a real broker, against raw inference.

Starts its own Kafka + S3 on free ports, publishes a model of the default architecture
(30-500-1000-500-2 on the Higgs-schema features), writes a backlog of demo events to the input
topic, starts one worker (``faust -A app worker``) and measures how fast predictions reach the
output topic. In the same run it measures raw ``predict_proba`` samples/s at the worker's
micro-batch size and thread count, and reports the ratio.

    .venv/bin/python bench/serving.py [--events 60000] [--batch-size 512] [--archive 0|1]

Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from app.settings import Settings  # noqa: E402
from app.stack import LocalStack, free_port  # noqa: E402
from app.topics import ensure_topics  # noqa: E402
from batch.demo_data import FEATURES, event_messages  # noqa: E402
from models.registry import Registry  # noqa: E402
from tests.support import WorkerProcess, announce, http, publish_small_model  # noqa: E402


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


async def produce_backlog(settings: Settings, n: int) -> float:
    """Write ``n`` demo events to the input topic; return events/s of the producer."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=20,
                                max_batch_size=256 * 1024)
    await producer.start()
    started = time.perf_counter()
    try:
        chunk = 5000
        for start in range(0, n, chunk):
            batch = event_messages(min(chunk, n - start), seed=start, start_id=start)
            futures = [await producer.send(settings.events_topic,
                                           json.dumps(m).encode(), key=m["id"].encode())
                       for m in batch]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return n / (time.perf_counter() - started)


async def collect_predictions(settings: Settings, n: int, timeout: float) -> list[int]:
    """Read the output topic until ``n`` distinct ids are predicted; their ``ts`` values."""
    consumer = AIOKafkaConsumer(settings.predictions_topic,
                                bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                auto_offset_reset="earliest", max_poll_records=5000)
    await consumer.start()
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    last_report = time.monotonic()
    try:
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(seen)} of {n} predictions after {timeout}s")
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                for r in records:
                    p = json.loads(r.value)
                    seen.setdefault(p["id"], p["ts"])
            if time.monotonic() - last_report > 5:
                say(f"{len(seen)} predictions so far")
                last_report = time.monotonic()
    finally:
        await consumer.stop()
    return list(seen.values())


def raw_inference(model: object, batch_size: int, threads: int, seconds: float = 5.0) -> float:
    """Samples/s of ``predict_proba`` on demo rows at ``batch_size`` with ``threads``."""
    torch.set_num_threads(threads)
    rows = np.array([[m["features"][f] for f in FEATURES]
                     for m in event_messages(batch_size, seed=7)], dtype=np.float64)
    model.predict_proba(rows)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict_proba(rows)
        done += batch_size
    return done / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=60000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batch-ms", type=int, default=20, help="SERVING_BATCH_MS")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the worker")
    parser.add_argument("--archive", type=int, choices=(0, 1), default=1,
                        help="ARCHIVE of the worker (1: also archive the events to the lake)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stratum-bench-"))
    say(f"starting Kafka + S3 on free ports (data in {work})")
    with LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        env = {**stack.environment("bench"),
               "WEB_PORT": str(free_port()), "STRATUM_APP_ID": "bench",
               "STRATUM_DATA_DIR": str(work / "worker"),
               "TOPIC_PARTITIONS": str(args.partitions),
               "SERVING_BATCH_SIZE": str(args.batch_size),
               "SERVING_BATCH_MS": str(args.batch_ms), "TORCH_THREADS": str(args.threads),
               "ARCHIVE": str(args.archive)}
        settings = Settings.from_env(env)
        registry = Registry(settings.registry_uri, settings.storage_options)
        ref = publish_small_model(registry, settings.model_name, list(FEATURES), ["b", "s"],
                                  hidden=(500, 1000, 500))
        say(f"published {ref.version} (30-500-1000-500-2)")
        asyncio.run(ensure_topics(settings))
        asyncio.run(announce(settings.bootstrap_servers, settings.updates_topic,
                             ref.to_message()))
        say(f"producing {args.events} events")
        produce_rate = asyncio.run(produce_backlog(settings, args.events))
        say(f"backlog written at {produce_rate:.0f} events/s; starting one worker")
        worker = WorkerProcess(env, work / "worker.log").start()
        try:
            worker.wait_ready()
            cpu_before = cpu_seconds(worker.proc.pid)
            ts = asyncio.run(collect_predictions(settings, args.events, timeout=600))
            table_lag_s = wait_for_table(worker.url, args.events, since_ms=max(ts))
            cpu_used = cpu_seconds(worker.proc.pid) - cpu_before
            metrics = http("GET", f"{worker.url}/metrics")[1]
        finally:
            worker.stop()
        span_s = (max(ts) - min(ts)) / 1000
        e2e = len(ts) / span_s
        say(f"{len(ts)} predictions in {span_s:.1f}s: {e2e:.0f} predictions/s end to end")
        model = registry.load(ref.manifest_uri, ref.sha256)
        raw = raw_inference(model, args.batch_size, args.threads)
        say(f"raw inference at batch {args.batch_size}, {args.threads} thread(s): "
            f"{raw:.0f} samples/s")
    batches = _histogram_count(metrics, "stratum_batch_size")
    figures = {
        "events": args.events,
        "e2e_predictions_per_s": round(e2e),
        "raw_inference_samples_per_s": round(raw),
        "e2e_to_raw_ratio": round(e2e / raw, 3),
        "batch_size": args.batch_size,
        "batch_ms": args.batch_ms,
        "mean_micro_batch": round(args.events / batches, 1) if batches else None,
        "torch_threads": args.threads,
        "archive": args.archive,
        "partitions": args.partitions,
        "producer_events_per_s": round(produce_rate),
        # Seconds after the last prediction until latest_predictions held a row per event.
        "table_lag_s": table_lag_s,
        # CPU the worker process spent per event: steadier than wall time on a busy machine.
        "worker_cpu_us_per_event": round(1e6 * cpu_used / args.events, 1),
    }
    print(json.dumps(figures), flush=True)
    return 0


def wait_for_table(url: str, rows: int, since_ms: int, timeout_s: float = 120) -> float:
    """Seconds from ``since_ms`` until ``latest_predictions`` holds ``rows`` rows."""
    deadline = time.monotonic() + timeout_s
    while True:
        tables = http("GET", f"{url}/tables/")[1]["tables"]
        size = next(t["size"] for t in tables if t["name"] == "latest_predictions")
        if size >= rows:
            return round(time.time() - since_ms / 1000, 2)
        if time.monotonic() > deadline:
            raise SystemExit(f"latest_predictions holds {size} of {rows} rows after {timeout_s}s")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _histogram_count(prometheus_text: str, name: str) -> float | None:
    for line in prometheus_text.splitlines():
        if line.startswith(f"{name}_count"):
            return float(line.split()[-1])
    return None


if __name__ == "__main__":
    sys.exit(main())

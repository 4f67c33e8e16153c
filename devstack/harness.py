"""Helpers for integration tests: a small published model, a worker process, topic readers."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.settings import Settings
from devstack.stack import die_with_parent_preexec
from transport.topics import ensure_topics
from models.network import MLP, load_factory
from models.manifest import CLASSIFICATION, REGRESSION, Manifest, Reference
from models.preprocessing import fit_preprocessor
from models.registry import ModelRef, Registry
from models.loaded import LoadedModel

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def scratch_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary directory for one run's broker data, lake and logs, removed afterwards
    (a benchmark writes gigabytes) unless ``keep``."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"[bench] data kept in {work}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def publish_small_model(registry: Registry, name: str, features: list[str],
                        classes: list[Any], seed: int = 0,
                        hidden: tuple[int, ...] = (16, 8), task: str = CLASSIFICATION,
                        factory: str | None = None,
                        params: Mapping[str, Any] | None = None) -> ModelRef:
    """Publish an untrained network with real preprocessing and reference rows.

    Scoring costs the same whatever the weights, so this serves tests and throughput
    benchmarks without a training run. ``task="regression"`` (with ``classes=[]``) publishes
    a regression: one output, and ``rmse``, ``mae`` and ``r2`` as its metrics. ``factory``
    (``package.module:function``) builds the network from that model factory with
    ``params`` instead of the built-in MLP of ``hidden`` sizes.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    X = rng.normal(size=(256, len(features)))
    regression = task == REGRESSION
    n_outputs = 1 if regression else len(classes)
    architecture: dict[str, Any]
    if factory is None:
        module = MLP(len(features), n_outputs, hidden=hidden, dropout=0.0).eval()
        architecture = module.architecture()
    else:
        module = load_factory(factory)(len(features), n_outputs, **dict(params or {})).eval()
        architecture = {"type": "factory", "factory": factory, "n_features": len(features),
                        "n_outputs": n_outputs, "params": dict(params or {})}
    metrics = ({"rmse": 1.0, "mae": 0.8, "r2": 0.0} if regression
               else {"accuracy": 0.5, "log_loss": 0.69, "auc": 0.5})
    placeholder = [0.0] if regression else [1.0 / len(classes)] * len(classes)
    draft = Manifest.draft(name=name, features=features, classes=classes, task=task,
                           preprocessing=fit_preprocessor(features, X).to_dict(),
                           architecture=architecture, metrics=metrics,
                           reference={"inputs": [[1.0] * len(features)],
                                      "outputs": [placeholder], "atol": 0.5})
    reference = X[:8]
    expected = LoadedModel(draft, module).outputs(reference)
    draft.reference = Reference(inputs=reference.tolist(), outputs=expected.tolist(),
                                atol=1e-5)
    return registry.publish(module, draft, onnx=False)


def deploy_small_model(env: Mapping[str, str], features: list[str],
                       classes: list[Any]) -> tuple[Settings, str]:
    """For the deployment ``env`` names: publish a small model, create the topics and announce
    the model; return the settings and the model's version."""
    settings = Settings.from_env(env)
    registry = Registry(settings.registry_uri, settings.storage_options)
    ref = publish_small_model(registry, settings.model_name, features, classes)
    run(ensure_topics(settings))
    run(announce(settings.bootstrap_servers, settings.updates_topic, ref.to_message()))
    return settings, ref.version


async def announce(bootstrap: str, topic: str, message: Mapping[str, Any]) -> None:
    """Produce one update message (a MODEL-REF, or anything a test wants to try)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, json.dumps(message).encode())
    finally:
        await producer.stop()


async def produce(bootstrap: str, topic: str, values: list[bytes | None]) -> list[tuple[int, int]]:
    """Produce raw values; return each one's (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        # A key on every message: Kafka needs one where the value is null (a tombstone).
        futures = [await producer.send(topic, key=f"k{i}".encode(), value=v)
                   for i, v in enumerate(values)]
        return [((md := await f).partition, md.offset) for f in futures]
    finally:
        await producer.stop()


async def consume_until(bootstrap: str, topic: str, done: Callable[[list[Any]], bool],
                        timeout: float = 60.0, group: str | None = None,
                        commit: bool = False,
                        decode: Callable[[bytes], Any] = json.loads) -> list[Any]:
    """Read ``topic`` (from ``group``'s committed offsets, else the start), decoding values,
    until ``done(values)`` holds.

    Then drain whatever else is already on the topic, so callers can assert exact counts, and
    commit the group's offsets when ``commit``.
    """
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    values: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(values):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met after {timeout}s "
                                   f"({len(values)} messages)")
            batches = await consumer.getmany(timeout_ms=500)
            values.extend(decode(r.value) for rs in batches.values() for r in rs)
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(parts)
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batches = await consumer.getmany(timeout_ms=500)
            values.extend(decode(r.value) for rs in batches.values() for r in rs)
        if commit:
            await consumer.commit()
    finally:
        await consumer.stop()
    return values


def http(method: str, url: str, body: Any = None, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, Any, str]:
    """One HTTP request; returns (status, JSON body or None, content type)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload, ctype = response.status, response.read(), response.headers.get(
                "Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, payload, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    try:
        return status, json.loads(payload), ctype
    except ValueError:
        return status, payload.decode("utf-8", "replace"), ctype


class WorkerProcess:
    """``faust -A app worker`` as a child process with its own environment and log."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{env['WEB_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN / "faust"), "-A", "app", "worker", "-l", "info"],
                                     cwd=REPO, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=die_with_parent_preexec())
        log.close()
        return self

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Block until ``/ready`` answers 200; return its body."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                status, body, _ = http("GET", f"{self.url}/ready")
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")


def run(coro: Any) -> Any:
    """Run a coroutine from a synchronous test."""
    return asyncio.run(coro)


def produce_records(bootstrap: str, topic: str,
                    records: list[tuple[bytes | None, bytes | None]]) -> list[tuple[int, int]]:
    """Produce raw ``(key, value)`` records, either of which may be null, with librdkafka;
    return each one's (partition, offset), in order."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                         "enable.idempotence": True})
    placed: list[tuple[int, int] | None] = [None] * len(records)
    failed: list[str] = []

    def delivered(index: int) -> Callable[[Any, Any], None]:
        def report(err: Any, message: Any) -> None:
            if err is not None:
                failed.append(f"record {index}: {err}")
            else:
                placed[index] = (message.partition(), message.offset())
        return report

    for index, (key, value) in enumerate(records):
        produce_waiting(producer, topic, value, key, delivered(index))
        producer.poll(0)
    left = producer.flush(60)
    if left or failed:
        raise RuntimeError(f"{left} records not delivered; {failed[:5]}")
    return [p for p in placed if p is not None]


def produce_waiting(producer: Any, topic: str, value: bytes | None, key: bytes | None,
                    on_delivery: Callable[[Any, Any], None] | None = None) -> None:
    """``producer.produce``, serving delivery reports while librdkafka's queue is full."""
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


class PacedFeed:
    """Produces ``message(n)`` for n = 0, 1, ... at ``rate`` records/s from a thread, until
    ``stop()`` or ``limit`` records. A subclass says what record n is, and may set
    ``reports`` to receive each delivery report in ``delivered``."""

    reports = False

    def __init__(self, bootstrap: str, topic: str, rate: float,
                 limit: int | None = None) -> None:
        from confluent_kafka import Producer

        self.topic, self.rate, self.limit = topic, rate, limit
        # linger.ms as a producer of a real feed would batch.
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                                  "partitioner": "murmur2_random"})
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def message(self, n: int) -> tuple[bytes, bytes]:
        """Record n's (key, value)."""
        raise NotImplementedError

    def delivered(self, err: Any, msg: Any) -> None:
        """A delivery report (only when ``reports``)."""

    def start(self) -> "PacedFeed":
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop producing, wait for every record's delivery; the number sent."""
        self._stop.set()
        self._thread.join()
        left = self.producer.flush(60)
        if left:
            raise RuntimeError(f"{left} records of the feed not delivered")
        return self.sent

    def _run(self) -> None:
        report = self.delivered if self.reports else None
        started = time.perf_counter()
        while not self._stop.is_set():
            due = int((time.perf_counter() - started) * self.rate) + 1
            if self.limit is not None:
                due = min(due, self.limit)
            while self.sent < due:
                key, value = self.message(self.sent)
                produce_waiting(self.producer, self.topic, value, key, report)
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.001)


def poll(read: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    """Call ``read`` until ``ok(value)`` holds; return the value (fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    value = read()
    while not ok(value):
        assert time.monotonic() < deadline, f"condition not met after {timeout}s: {value!r}"
        time.sleep(0.2)
        value = read()
    return value


def write_dataset(settings: Settings, name: str, table: Any) -> str:
    """Write a pyarrow ``table`` as one Parquet file of the dataset ``name``, next to the
    deployment's lake (``<lake's parent>/datasets/<name>/``); return the dataset's URI."""
    import pyarrow.parquet as pq
    import s3fs

    uri = f"{settings.lake_uri.rsplit('/lake/', 1)[0]}/datasets/{name}"
    fs = s3fs.S3FileSystem(**settings.storage_options)
    with fs.open(f"{uri}/part-0.parquet", "wb") as out:
        pq.write_table(table, out)
    return uri


@contextlib.contextmanager
def batch_deployment(name: str, keep: bool = False) -> Iterator[tuple[Settings, Any]]:
    """A scratch directory, a local stack (Kafka and S3 on free ports, bucket ``bench``) and
    a local SparkSession: the settings of a deployment on them and the session, for benchmarks
    that run the batch job; everything is stopped (and the directory removed unless
    ``keep``) on leaving."""
    from batch.spark import get_session
    from devstack.stack import LocalStack

    with scratch_dir(f"stratum-bench-{name}-", keep) as work, \
            LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        settings = Settings.from_env({**stack.environment("bench"),
                                      "UPDATES_TOPIC": "bench-model-updates"})
        spark = get_session(app_name=f"stratum-bench-{name}")
        try:
            yield settings, spark
        finally:
            spark.stop()

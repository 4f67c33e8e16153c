"""Serving throughput with 1% hostile records mixed in, against the same feed clean.

Starts its own Kafka + S3 on free ports and publishes the model of ``bench/serving.py``
(30-500-1000-500-2 on the Higgs-schema features). Writes two backlogs of the same
``--events`` demo events (half labelled): ``clean``, and ``mixed``, the same events with one
malformed record (devstack/corpus.py) after every ``100 / --malformed-percent`` of them, cycling
through every malformed kind. The kinds close to the broker's size limit (about 950 KB each)
go in once each (``--huge-every`` repeats them more often): at 1% they would be most of the
bytes on the topic, which measures the network rather than the handling of bad input.

Then, one after another on that broker, a worker with everything on (tables, the lake archive,
the speed layer) serves each backlog, measured as in ``bench/serving.py``: records answered
(predictions and dead letters) per second from the first answer to the last by the broker's
timestamps, predictions per second, and the worker's CPU per record. Afterwards it checks what
the mixed run wrote: every malformed record dead-lettered once, at its source offset and with
a reason, and exactly one prediction per valid event. On a machine others share, the worker's
CPU per valid event compares the two runs more steadily than their rates do.

    .venv/bin/python bench/hostile.py [--events 200000] [--malformed-percent 1]

Ends with one line holding a JSON object of the figures (``mixed_over_clean``: the ratios).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import importlib.util  # noqa: E402

import orjson  # noqa: E402
from confluent_kafka import Producer  # noqa: E402

from devstack.stack import LocalStack  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402
from demo.data import FEATURES, event_messages  # noqa: E402
from devstack.corpus import NEAR_MAX_BYTES, HostileRecord, malformed_records  # noqa: E402
from devstack.harness import scratch_dir  # noqa: E402


def _bench_serving() -> Any:
    """bench/serving.py as a module (bench/ is no package, and on sys.path its batch.py
    would hide the batch package)."""
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "bench" / "serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_serving = _bench_serving()
Deployment, end_offsets, load, publish = (_serving.Deployment, _serving.end_offsets,
                                          _serving.load, _serving.publish)
run_stratum, say, time_span = _serving.run_stratum, _serving.say, _serving.time_span

CLASSES = ["b", "s"]


def backlog_records(n: int, every: int, huge_every: int, tag: str
                    ) -> tuple[int, list[HostileRecord]]:
    """The malformed records of a mixed backlog of ``n`` valid events, in order: one after
    every ``every`` valid events (``every`` 0: none). Returns how many there are and them."""
    if not every:
        return 0, []
    kinds = malformed_records(FEATURES, CLASSES, tag)
    huge = [r for r in kinds if len(r.value or b"") >= NEAR_MAX_BYTES // 2]
    small = [r for r in kinds if r not in huge]
    count = n // every
    if huge_every:
        at_huge = set(range(huge_every - 1, count, huge_every))
    else:  # each once, spread over the backlog
        at_huge = {int((j + 0.5) * count / len(huge)) for j in range(min(len(huge), count))}
    out = []
    taken = {id(huge): 0, id(small): 0}
    for k in range(count):
        pool = huge if k in at_huge else small
        out.append(pool[taken[id(pool)] % len(pool)])
        taken[id(pool)] += 1
    return len(out), out


def produce_backlog(bootstrap: str, topic: str, n: int, malformed: list[HostileRecord],
                    every: int) -> tuple[dict[str, Any], set[tuple[int, int]]]:
    """``n`` demo events with ``malformed`` records interleaved (one after every ``every``
    events); returns figures of what was written and the malformed records' positions."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "partitioner": "murmur2_random", "enable.idempotence": True})
    positions: set[tuple[int, int]] = set()
    failed: list[str] = []

    def placed(err: Any, message: Any) -> None:
        if err is not None:
            failed.append(str(err))
        else:
            positions.add((message.partition(), message.offset()))

    def send(value: bytes | None, key: bytes | None, on_delivery: Any = None) -> None:
        while True:
            try:
                if on_delivery is None:
                    producer.produce(topic, value, key)
                else:
                    producer.produce(topic, value, key, on_delivery=on_delivery)
                return
            except BufferError:
                producer.poll(0.05)

    started = time.perf_counter()
    written_bytes = bad_bytes = 0
    next_bad = 0
    for start in range(0, n, 10_000):
        for k, event in enumerate(event_messages(min(10_000, n - start), seed=start,
                                                 start_id=start)):
            value = orjson.dumps(event)
            send(value, event["id"].encode())
            written_bytes += len(value)
            i = start + k + 1
            if every and i % every == 0 and next_bad < len(malformed):
                record = malformed[next_bad]
                next_bad += 1
                send(record.value, record.key, placed)
                bad_bytes += len(record.value or b"")
        producer.poll(0)
    assert producer.flush(300) == 0 and not failed, failed[:5]
    seconds = time.perf_counter() - started
    return ({"valid": n, "malformed": len(malformed), "valid_mib": round(written_bytes / 2**20, 1),
             "malformed_mib": round(bad_bytes / 2**20, 1),
             "written_per_s": round((n + len(malformed)) / seconds)}, positions)


def read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every message of ``topic``: ``(partition, offset, key, value)``."""
    return [(m.partition(), m.offset(), m.key(), m.value())
            for m in _serving.read_topic(bootstrap, topic)]


def check_outputs(bootstrap: str, d: Deployment, n: int,
                  malformed_at: set[tuple[int, int]]) -> dict[str, Any]:
    """What a run wrote, against what it was given."""
    predictions = read_all(bootstrap, d.settings.predictions_topic)
    keys = [key for _, _, key, _ in predictions]
    dead = [orjson.loads(value) for _, _, _, value in read_all(bootstrap, d.settings.dlq_topic)]
    sources = [(m["source"]["partition"], m["source"]["offset"]) for m in dead]
    figures = {"predictions": len(predictions), "distinct_ids_predicted": len(set(keys)),
               "dead_letters": len(dead),
               "dead_letters_without_reason": sum(not m["error"].strip() for m in dead)}
    figures["one_prediction_per_valid_event"] = (len(predictions) == n == len(set(keys)))
    figures["every_malformed_dead_lettered_once"] = (
        len(sources) == len(set(sources)) and set(sources) == malformed_at)
    return figures


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    every = round(100 / args.malformed_percent) if args.malformed_percent else 0
    figures: dict[str, Any] = {"events": args.events, "malformed_percent": args.malformed_percent,
                               "batch_size": args.batch_size, "load_before": load()}
    say(f"starting Kafka + S3 on free ports (data in {work}); load {load()}")
    with LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        publish(stack)
        common = {"ARCHIVE": "1", "SPEED_LAYER": "1", "SERVING_BATCH_SIZE": str(args.batch_size),
                  "TORCH_THREADS": str(args.threads)}
        n_bad, bad = backlog_records(args.events, every, args.huge_every, "bench")
        inputs = {}
        for name, records in (("clean", []), ("mixed", bad)):
            topic = f"hostile-{name}-events"
            asyncio.run(ensure_topics(Deployment(stack, work, f"{name}-input", topic,
                                                 args.partitions, {}).settings))
            written, positions = produce_backlog(stack.bootstrap, topic, args.events, records,
                                                 every)
            inputs[name] = (topic, positions)
            figures[f"{name}_backlog"] = written
            say(f"{name} backlog: {written}")
        for name in args.order.split(","):
            topic, positions = inputs[name]
            d = Deployment(stack, work, name, topic, args.partitions, common)
            expected = args.events + len(positions)
            result = run_stratum(d, stack, work, expected)
            first, last = time_span(stack.bootstrap, [d.settings.predictions_topic])
            result["predictions_per_s"] = round(args.events / (last - first))
            # CPU is what a busy machine distorts least: the worker's, per valid event.
            result["cpu_us_per_valid_event"] = round(
                result["cpu_us_per_event"] * expected / args.events, 1)
            result.update(check_outputs(stack.bootstrap, d, args.events, positions))
            result["load_after"] = load()
            figures[name] = result
            say(f"{name}: {result}")
    clean, mixed = figures["clean"], figures["mixed"]
    figures["mixed_over_clean"] = {
        "answered_per_s": round(mixed["per_s"] / clean["per_s"], 3),
        "predictions_per_s": round(mixed["predictions_per_s"] / clean["predictions_per_s"], 3),
        "cpu_us_per_valid_event": round(mixed["cpu_us_per_valid_event"]
                                        / clean["cpu_us_per_valid_event"], 3)}
    figures["within_10_percent"] = figures["mixed_over_clean"]["predictions_per_s"] >= 0.9
    figures["load_after"] = load()
    say(f"mixed/clean: {figures['mixed_over_clean']}; load {load()}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--malformed-percent", type=float, default=1.0)
    parser.add_argument("--huge-every", type=int, default=0, metavar="K",
                        help="every K-th malformed record is a near-limit one (default: each "
                             "near-limit kind once)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="TORCH_THREADS of the worker")
    parser.add_argument("--order", default="clean,mixed",
                        help="which backlogs to serve, in order (e.g. mixed,clean)")
    parser.add_argument("--keep", action="store_true", help="keep the run's data directory")
    args = parser.parse_args()
    if sorted(args.order.split(",")) != ["clean", "mixed"]:
        parser.error("--order names clean and mixed, once each")
    with scratch_dir("stratum-hostile-", args.keep) as work:
        figures = run(args, work)
    print(json.dumps(figures), flush=True)
    ok = all(figures[n]["one_prediction_per_valid_event"]
             and figures[n]["every_malformed_dead_lettered_once"] for n in ("clean", "mixed"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

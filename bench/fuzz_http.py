"""An HTTP fuzz of every endpoint of a worker: no request may get an answer >= 500.

Random methods (odd ones too), real routes with random ids (very long, percent-encoded,
non-UTF-8, unicode) and made-up paths, broken and huge headers, wrong Content-Length, wrong or
missing bearer tokens, bodies up to several MB (random bytes, 100,000 ``[``, deep objects,
huge arrays, invalid UTF-8, requests of the right shape with the wrong types), slow clients
that send byte by byte and then finish or hang up (devstack/http_fuzz.py makes the requests).

Without ``--url`` it starts its own Kafka + S3 on free ports, publishes a small model and
runs one worker (``faust -A app worker``, admin endpoints on) with a few predictions in its
table; with ``--url`` it fuzzes the worker there (``--token``: its ADMIN_TOKEN, if any).

    .venv/bin/python bench/fuzz_http.py [--requests 2000] [--seed 1] [--url URL]

Ends with one line holding a JSON object: requests, answers by status class and status, the
5xx count with examples, refusals that were not JSON errors, and whether the worker still
answered ``GET /ready`` afterwards.
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

from app.settings import Settings  # noqa: E402
from devstack.stack import LocalStack, free_port  # noqa: E402
from devstack.http_fuzz import FuzzReport, fuzz, make_requests  # noqa: E402
from devstack.harness import (WorkerProcess, consume_until, deploy_small_model,  # noqa: E402
                           http, produce_records, scratch_dir)

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]
TOKEN = "fuzz-admin-token"


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fuzz_worker(url: str, token: str | None, n: int, seed: int, known: list[str],
                concurrency: int) -> FuzzReport:
    host = url.split("//", 1)[1].rstrip("/")
    requests = make_requests(n, seed, host, token=token, known_ids=known,
                             valid_event={"id": "fuzz", "features": [1.0, 2.0, 3.0]})
    say(f"{n} requests (seed {seed}) to {url}, {concurrency} at a time; load {load()}")
    return asyncio.run(fuzz(url, requests, seed=seed, concurrency=concurrency))


def wait_ready(url: str, timeout: float = 120.0) -> None:
    """Wait for ``GET /ready`` to answer 200 (it answers 503 until a model is loaded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http("GET", f"{url.rstrip('/')}/ready")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} not ready after {timeout} s")
        time.sleep(0.5)


def own_worker(args: argparse.Namespace, work: Path) -> tuple[FuzzReport, bool]:
    with LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        env = {**stack.environment("bench"), "STRATUM_APP_ID": "fuzz",
               "WEB_PORT": str(free_port()), "STRATUM_DATA_DIR": str(work / "worker"),
               "ADMIN_TOKEN": TOKEN, "LAKE_URI": "s3://bench/lake/fuzz"}
        settings: Settings
        settings, version = deploy_small_model(env, FEATURES, CLASSES)
        say(f"published {version}")
        worker = WorkerProcess(env, work / "worker.log").start()
        try:
            worker.wait_ready(timeout=180)
            known = [f"fuzz-known-{i}" for i in range(50)]
            produce_records(stack.bootstrap, settings.events_topic, [
                (None, json.dumps({"id": i, "features": [1, 2, 3]}).encode()) for i in known])
            asyncio.run(consume_until(stack.bootstrap, settings.predictions_topic,
                                      lambda vs: len(vs) >= len(known)))
            report = fuzz_worker(worker.url, TOKEN, args.requests, args.seed, known,
                                 args.concurrency)
            alive = worker.proc is not None and worker.proc.poll() is None
            if report.server_errors or not alive:
                say(f"worker log ends:\n{worker.log_tail(40)}")
        finally:
            worker.stop()
    return report, alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--url", help="fuzz the worker there instead of starting one")
    parser.add_argument("--token", help="the ADMIN_TOKEN of the worker at --url")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the run's data directory")
    args = parser.parse_args()
    started = time.monotonic()
    figures: dict[str, Any] = {"seed": args.seed, "load_before": load()}
    if args.url:
        wait_ready(args.url)
        report = fuzz_worker(args.url, args.token, args.requests, args.seed, [],
                             args.concurrency)
        alive = report.alive_after
    else:
        with scratch_dir("stratum-fuzz-", args.keep) as work:
            report, alive = own_worker(args, work)
    summary = report.summary()
    say(f"{summary['requests']} requests in {summary['seconds']} s: {summary['by_class']}; "
        f"{summary['server_errors']} answers >= 500; worker alive afterwards: {alive}")
    for example in summary["server_error_examples"]:
        say(f"  5xx: {example}")
    figures.update(summary)
    figures.update({"worker_alive": alive and report.alive_after, "load_after": load(),
                    "total_s": round(time.monotonic() - started, 1)})
    print(json.dumps(figures), flush=True)
    return 0 if not report.server_errors and figures["worker_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())

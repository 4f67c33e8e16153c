"""Batch rebuild throughput: seconds per stage and rows/s at several lake sizes, and training
time against plain single-process torch on the same arrays.

Starts its own S3 server on a free port, writes demo data (Higgs-schema events) into one lake
per size, and runs the batch job on each with one shared local SparkSession (so that its start
is paid once and reported apart). For every size it reports the seconds of each stage, the
rows/s of the whole job, the cost per row (job time without the Spark session start, in
microseconds), and the training time of the job against a plain torch loop (same network, same
optimiser, same mini-batches and epochs, one process) on exactly the job's training arrays:
the job's own training stage, and (because the machine may be shared) the job's trainer and the
plain loop run again back to back, best of two each, in wall and CPU seconds.

    .venv/bin/python bench/batch.py [--sizes 250000,1000000,4000000] [--epochs 1]
                                    [--hidden 64,32] [--threads 2]

4M rows on a 2-core machine take several minutes; ``--sizes`` and ``--epochs`` size a run.
Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from app.settings import Settings  # noqa: E402
from app.stack import LocalStack  # noqa: E402
from batch import prepare  # noqa: E402
from batch.demo_data import write_lake  # noqa: E402
from batch.job import JobConfig, run_job  # noqa: E402
from batch.train import parse_hidden, train_classifier  # noqa: E402

# Stages whose cost grows with the data; the others (session, lock, publish) are per run.
_DATA_STAGES = ("list", "read", "clean and split", "fit preprocessing", "collect", "train",
                "evaluate")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def plain_torch_seconds(X: np.ndarray, y: np.ndarray, n_classes: int, hidden: tuple[int, ...],
                        dropout: float, epochs: float, batch_size: int, lr: float,
                        threads: int) -> float:
    """Seconds of a textbook training loop: Adam, cross-entropy, shuffled mini-batches."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = X.shape[1]
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    net = nn.Sequential(*layers, nn.Linear(width, n_classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    steps = math.ceil(len(X) / batch_size)
    total_steps = int(round(epochs * steps))
    net.train()
    start = time.perf_counter()
    done = 0
    while done < total_steps:
        order = torch.randperm(len(X))
        for step in range(min(steps, total_steps - done)):
            idx = order[step * batch_size:(step + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(Xt[idx]), yt[idx]).backward()
            optimizer.step()
            done += 1
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="250000,1000000,4000000",
                        help="comma-separated lake sizes in rows")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--hidden", default="64,32")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--driver-memory", default="6g", help="SPARK_DRIVER_MEMORY")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    hidden = parse_hidden(args.hidden)
    os.environ.setdefault("SPARK_DRIVER_MEMORY", args.driver_memory)

    work = Path(tempfile.mkdtemp(prefix="stratum-bench-batch-"))
    say(f"starting S3 on a free port (data in {work})")
    with LocalStack(data_dir=work / "stack", with_kafka=False, s3_buckets=["bench"]) as stack:
        env = {"S3_ENDPOINT_URL": stack.s3_endpoint_url, "REGISTRY_URI": "s3://bench/models",
               "LAKE_URI": "s3://bench/lake"}
        settings = Settings.from_env(env)
        from batch.spark import get_session

        started = time.perf_counter()
        spark = get_session(app_name="stratum-bench-batch")
        session_s = time.perf_counter() - started
        say(f"Spark session in {session_s:.1f}s (paid once, not in the per-row cost)")
        results = []
        try:
            for n in sizes:
                lake = f"s3://bench/lake-{n}"
                started = time.perf_counter()
                chunk = 1_000_000
                for first in range(0, n, chunk):
                    write_lake(lake, settings.storage_options, min(chunk, n - first),
                               seed=first, start_id=first)
                say(f"{n} rows: demo data written in {time.perf_counter() - started:.1f}s")
                config = JobConfig(data_uri=lake, model_name=f"bench-{n}", hidden=hidden,
                                   dropout=0.0, epochs=args.epochs, batch_size=args.batch_size,
                                   lr=args.lr, patience=0, threads=args.threads,
                                   announce=False, compare_active=False, keep_versions=0,
                                   onnx=False, keep_arrays=True)
                result = run_job(settings, config, spark=spark,
                                 progress=lambda line, n=n: say(f"{n} rows: {line}"))
                timings = dict(result.timings)
                X, y = result.arrays[prepare.TRAIN]
                Xv, yv = result.arrays[prepare.VALIDATION]
                job_train_s = float(result.training["train_seconds"])
                # The machine may be shared: the job's trainer and the plain loop run again
                # back to back, twice, and the best wall and CPU seconds of each are compared.
                walls: dict[str, list[float]] = {"job": [], "plain": []}
                cpus: dict[str, list[float]] = {"job": [], "plain": []}
                for _ in range(2):
                    for kind in ("job", "plain"):
                        wall, cpu = time.perf_counter(), time.process_time()
                        if kind == "job":
                            torch.set_num_threads(args.threads)
                            train_classifier(X, y, len(result.classes), config.train_config(),
                                             X_val=Xv, y_val=yv)
                        else:
                            plain_torch_seconds(X, y, len(result.classes), hidden, 0.0,
                                                float(result.training["epochs_run"]),
                                                result.training["batch_size"], args.lr,
                                                args.threads)
                        walls[kind].append(time.perf_counter() - wall)
                        cpus[kind].append(time.process_time() - cpu)
                plain_s = min(walls["plain"])
                job_s = timings["total"] - timings.get("spark session", 0.0)
                data_s = sum(timings.get(stage, 0.0) for stage in _DATA_STAGES)
                row = {
                    "rows": n, "train_rows": int(len(X)), "seconds": timings,
                    "job_seconds": round(job_s, 2),
                    "rows_per_s": round(n / job_s),
                    "us_per_row": round(1e6 * job_s / n, 2),
                    "data_stage_us_per_row": round(1e6 * data_s / n, 2),
                    "train_seconds": round(job_train_s, 2),
                    "plain_torch_train_seconds": round(plain_s, 2),
                    "train_ratio_in_run": round(job_train_s / plain_s, 3),
                    "trainer_seconds_best": round(min(walls["job"]), 2),
                    "train_ratio": round(min(walls["job"]) / plain_s, 3),
                    "train_cpu_ratio": round(min(cpus["job"]) / min(cpus["plain"]), 3),
                    "test_accuracy": round(result.metrics["accuracy"], 4),
                    "test_auc": round(result.metrics["auc"], 4),
                }
                results.append(row)
                say(f"{n} rows: job {job_s:.1f}s ({row['rows_per_s']} rows/s, "
                    f"{row['us_per_row']} us/row); training {job_train_s:.1f}s vs plain torch "
                    f"{plain_s:.1f}s; back to back: trainer {row['trainer_seconds_best']}s, "
                    f"ratio {row['train_ratio']} (CPU {row['train_cpu_ratio']})")
                say(f"{n} rows: stages " + ", ".join(f"{k} {v:.1f}s"
                                                     for k, v in timings.items()))
        finally:
            spark.stop()

    costs = [r["us_per_row"] for r in results]
    figures = {
        "sizes": sizes, "epochs": args.epochs, "hidden": list(hidden),
        "threads": args.threads, "spark_session_seconds": round(session_s, 2),
        "runs": results,
        "us_per_row": costs,
        # Largest cost per row over the smallest: at most 1.25 means within 25%.
        "cost_per_row_spread": round(max(costs) / min(costs), 3) if costs else None,
        "train_ratio_max": max(r["train_ratio"] for r in results) if results else None,
    }
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

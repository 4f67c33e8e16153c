"""Batch rebuild throughput: seconds per stage and rows/s at several lake sizes, fixed costs
apart from per-row costs, and training time against plain single-process torch.

Starts its own Kafka broker and S3 server on free ports, writes demo data (Higgs-schema events)
into one lake per size, and runs the whole batch job on each (lock, list, read, clean and
split, fit preprocessing, collect, active model, train, evaluate, publish with ONNX, announce,
prune: the job's defaults, only the network is sized by the options) with one shared local
SparkSession. Before the sizes, one warm-up run on a small lake pays what the first job of a
process pays once (JIT compilation, Python workers, torch's thread pools); it is reported
apart, with the Spark session start. Each size runs ``--repeats`` times (each under a model
name of its own, so that every run does the same work) and the fastest run is reported; every
run's seconds and the load average around it are in the figures (the machine may be shared).

Stages are of two kinds. Fixed per-run stages do not depend on the rows (lock, list, Spark
session, active model, publish, announce, prune). Data stages grow with the rows (read, clean
and split, fit preprocessing, collect, train, evaluate). For every size the bench reports each
stage's seconds, rows/s and microseconds per row, the job's total cost per row, and the cost per
row of the data stages alone, with the spread (largest over smallest) of each across the sizes.
The data stages carry a fixed part too (every Spark action has a latency of its own), so the
bench also fits ``seconds = fixed + per_row * rows`` per stage and in all, and reports the cost
per row net of that fixed part and the marginal cost per row from one size to the next, each
with its spread.

Training is compared on exactly the job's training arrays with the same network, optimiser,
batch size, epochs and threads: the job's own training path (:func:`batch.candidates.
train_candidates`, with its validation pass after each epoch), the job's trainer without
validation (the same work as the plain loop), and a textbook torch loop, in one process. They
run back to back in rounds, in a rotating order, for at least ``--rounds`` rounds and
``--compare-seconds`` seconds; the best wall and CPU seconds of each count.

    .venv/bin/python bench/batch.py [--sizes 250000,1000000,4000000]
                                    [--hidden H] [--epochs N] [--dropout D] [--patience P]
                                    [--batch-size B] [--lr LR] [--threads 2]
                                    [--repeats 1] [--rounds 1] [--compare-seconds 10]
                                    [--compare job,job_no_validation,plain]
                                    [--warmup-rows 50000]

Without options the job runs as ``python -m batch run`` would: the ``BATCH_*`` defaults, a
500-1000-500 network trained for 3 epochs. That network takes about 75 s per million training
rows and epoch on two cores, so the default sizes take about 45 minutes with ``--compare
job,plain``; ``--hidden 64,32 --epochs 1 --dropout 0 --patience 0`` measures the data stages
with little training in a few minutes. Ends with one line holding a JSON object of the figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from app.settings import Settings  # noqa: E402
from devstack.stack import LocalStack  # noqa: E402
from batch import prepare  # noqa: E402
from batch.candidates import Arrays, train_candidates  # noqa: E402
from demo.data import write_lake  # noqa: E402
from batch.job import JobConfig, JobResult, run_job  # noqa: E402
from batch.train import train_classifier  # noqa: E402
from devstack.harness import scratch_dir  # noqa: E402

#: Stages whose cost does not depend on the rows.
FIXED_STAGES = ("lock", "list", "spark session", "lock check", "active model", "publish",
                "announce", "prune")
#: Stages whose cost grows with the rows.
DATA_STAGES = ("read", "clean and split", "fit preprocessing", "collect", "train", "evaluate")
_MAX_ROUNDS = 20
#: Training paths the comparison can time (job and plain always).
COMPARED = ("job", "job_no_validation", "plain")


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def load_average() -> float:
    """One-minute load average (the machine may be shared)."""
    return round(os.getloadavg()[0], 2)


def plain_torch_train(X: np.ndarray, y: np.ndarray, n_classes: int, hidden: tuple[int, ...],
                      dropout: float, epochs: float, batch_size: int, lr: float,
                      threads: int) -> None:
    """A textbook training loop: Adam, cross-entropy, shuffled mini-batches, nothing else."""
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
    done = 0
    while done < total_steps:
        order = torch.randperm(len(X))
        for step in range(min(steps, total_steps - done)):
            idx = order[step * batch_size:(step + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net(Xt[idx]), yt[idx]).backward()
            optimizer.step()
            done += 1


def compare_training(result: JobResult, config: JobConfig, threads: int, rounds: int,
                     min_seconds: float, compare: tuple[str, ...] = COMPARED
                     ) -> dict[str, Any]:
    """Best wall and CPU seconds of the job's training path, its trainer without validation
    and the plain loop, run back to back on the job's own training arrays: ``rounds`` rounds,
    and more (up to 20) until the comparison has taken ``min_seconds``."""
    X, y = result.arrays[prepare.TRAIN]
    Xv, yv = result.arrays[prepare.VALIDATION]
    k = len(result.classes)
    train_config = config.train_config()
    epochs_run = float(result.training["epochs_run"])
    batch_size = int(result.training["batch_size"])  # after the job's small-data cap
    every: dict[str, Callable[[], object]] = {
        "job": lambda: train_candidates(Arrays(X, y, Xv, yv, k), [train_config],
                                        threads=threads, progress=lambda line: None),
        "job_no_validation": lambda: train_classifier(X, y, k, train_config),
        "plain": lambda: plain_torch_train(X, y, k, train_config.hidden, train_config.dropout,
                                           epochs_run, batch_size, train_config.lr, threads),
    }
    kinds = {name: every[name] for name in compare}
    names = list(kinds)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    r = 0
    # Short trainings are at the mercy of every other process: more rounds for them.
    while r < rounds or (time.perf_counter() - started < min_seconds and r < _MAX_ROUNDS):
        for name in names[r % len(names):] + names[:r % len(names)]:
            torch.set_num_threads(threads)
            w, c = time.perf_counter(), time.process_time()
            kinds[name]()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
        r += 1
    best = {name: min(wall[name]) for name in names}
    best_cpu = {name: min(cpu[name]) for name in names}
    same_work = "job_no_validation" in best
    return {
        "rounds": r, "epochs": epochs_run, "batch_size": batch_size,
        "wall_seconds": {n: round(v, 3) for n, v in best.items()},
        "cpu_seconds": {n: round(v, 3) for n, v in best_cpu.items()},
        "all_wall_seconds": {n: [round(v, 3) for v in vs] for n, vs in wall.items()},
        # The job's path as it runs (with validation) over the plain loop ...
        "ratio": round(best["job"] / best["plain"], 3),
        "cpu_ratio": round(best_cpu["job"] / best_cpu["plain"], 3),
        # ... and like for like: the same work, the job's trainer without validation.
        "ratio_same_work": (round(best["job_no_validation"] / best["plain"], 3)
                            if same_work else None),
        "cpu_ratio_same_work": (round(best_cpu["job_no_validation"] / best_cpu["plain"], 3)
                                if same_work else None),
    }


def spread(values: list[float]) -> float | None:
    """Largest over smallest (1.25 means within 25%)."""
    return round(max(values) / min(values), 3) if values and min(values) > 0 else None


def linear_fit(rows: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_row * rows``: (fixed seconds, per-row seconds)."""
    per_row, fixed = np.polyfit(np.asarray(rows, float), np.asarray(seconds, float), 1)
    return float(fixed), float(per_row)


def job_config(settings: Settings, args: argparse.Namespace, lake: str) -> JobConfig:
    """The job as ``python -m batch run`` configures it, with the options given."""
    return JobConfig.from_settings(settings, data_uri=lake, hidden=args.hidden,
                                   epochs=args.epochs, dropout=args.dropout,
                                   batch_size=args.batch_size, lr=args.lr,
                                   patience=args.patience, threads=args.threads,
                                   keep_arrays=True)


def run_size(n: int, settings: Settings, spark: Any, args: argparse.Namespace,
             repeats: int, compare: bool) -> dict[str, Any]:
    """Write ``n`` demo rows to a fresh lake and rebuild a model from them ``repeats`` times
    (each under a model name of its own, so that every run does the same work); the fastest
    run's stages are reported."""
    lake = f"s3://bench/lake-{n}"
    started = time.perf_counter()
    chunk = 1_000_000
    for first in range(0, n, chunk):
        write_lake(lake, settings.storage_options, min(chunk, n - first), seed=first,
                   start_id=first)
    say(f"{n} rows: demo data written in {time.perf_counter() - started:.1f}s")
    config = job_config(settings, args, lake)
    best: JobResult | None = None
    totals, loads = [], []
    for r in range(repeats):
        load_before = load_average()
        result = run_job(settings, dataclasses.replace(config, model_name=f"bench-{n}-{r}"),
                         spark=spark, progress=lambda line: say(f"{n} rows: {line}"))
        loads.append([load_before, load_average()])
        if not result.published:
            raise SystemExit(f"the {n}-row candidate was not published: "
                             f"{result.decision.reason}")
        totals.append(result.timings["total"])
        say(f"{n} rows: run {r + 1}/{repeats}: {result.timings['total']:.1f}s "
            f"(load {loads[-1][0]} -> {loads[-1][1]})")
        if best is None or result.timings["total"] < best.timings["total"]:
            best = result
        del result
    assert best is not None
    timings = dict(best.timings)
    total = timings.pop("total")
    unstaged = total - sum(timings.values())
    fixed_s = sum(timings.get(s, 0.0) for s in FIXED_STAGES)
    data_s = sum(timings.get(s, 0.0) for s in DATA_STAGES)
    epochs_run = float(best.training["epochs_run"])
    train_rows = int(best.rows[prepare.TRAIN])
    row: dict[str, Any] = {
        "rows": n, "train_rows": train_rows, "runs": repeats,
        "run_seconds": [round(t, 3) for t in totals], "load_average": loads,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "unstaged_seconds": round(unstaged, 3),
        "rows_per_s": {s: round(n / timings[s]) for s in DATA_STAGES if timings.get(s)},
        "us_per_row": {s: round(1e6 * timings[s] / n, 3) for s in DATA_STAGES if s in timings},
        "job_seconds": round(total, 3),
        "job_rows_per_s": round(n / total),
        "job_us_per_row": round(1e6 * total / n, 3),
        "fixed_seconds": round(fixed_s, 3),
        "data_seconds": round(data_s, 3),
        "data_us_per_row": round(1e6 * data_s / n, 3),
        "train_seconds_per_epoch": round(timings["train"] / epochs_run, 3),
        "train_us_per_row_epoch": round(1e6 * timings["train"] / epochs_run / train_rows, 3),
        "test_accuracy": round(best.metrics["accuracy"], 4),
        "test_auc": round(best.metrics["auc"], 4),
    }
    say(f"{n} rows: best run {total:.1f}s ({row['job_rows_per_s']} rows/s, "
        f"{row['job_us_per_row']} us/row); fixed stages {fixed_s:.1f}s; data stages "
        f"{data_s:.1f}s ({row['data_us_per_row']} us/row)")
    say(f"{n} rows: " + ", ".join(
        f"{s} {timings[s]:.2f}s" + (f" ({row['rows_per_s'][s]} rows/s)"
                                   if s in row["rows_per_s"] else "")
        for s in timings))
    if compare:
        row["training"] = compare_training(best, config, config.threads, args.rounds,
                                           args.compare_seconds, args.compare)
        c = row["training"]
        say(f"{n} rows: training, best of {c['rounds']} back to back: "
            + ", ".join(f"{name} {sec}s" for name, sec in c["wall_seconds"].items())
            + f": ratio {c['ratio']} (CPU {c['cpu_ratio']}), same work "
            f"{c['ratio_same_work']} (CPU {c['cpu_ratio_same_work']})")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="250000,1000000,4000000",
                        help="comma-separated lake sizes in rows")
    for name, what in (("hidden", "hidden layer sizes"), ("epochs", "epochs"),
                       ("dropout", "dropout"), ("batch-size", "mini-batch rows"),
                       ("lr", "learning rate")):
        setting = "BATCH_" + name.upper().replace("-", "_")
        parser.add_argument(f"--{name}", help=f"{what} (default: {setting})")
    parser.add_argument("--patience", type=int, help="early-stopping patience "
                        "(default: BATCH_PATIENCE)")
    parser.add_argument("--threads", type=int, help="torch threads (default: BATCH_THREADS)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="job runs per size (the fastest is reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="least back-to-back rounds of the training comparison")
    parser.add_argument("--compare", default=",".join(COMPARED),
                        help="training paths to time: job, job_no_validation, plain")
    parser.add_argument("--compare-seconds", type=float, default=10.0,
                        help="more rounds (up to 20) until the comparison took this long")
    parser.add_argument("--warmup-rows", type=int, default=50_000,
                        help="rows of the warm-up run (0: none)")
    parser.add_argument("--driver-memory", default="6g", help="SPARK_DRIVER_MEMORY")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's data directory (broker logs, worker logs, lake)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.compare = tuple(k.strip() for k in args.compare.split(",") if k.strip())
    if not {"job", "plain"} <= set(args.compare) <= set(COMPARED):
        parser.error(f"--compare: expected job, plain and optionally job_no_validation, "
                     f"got {','.join(args.compare)}")
    os.environ.setdefault("SPARK_DRIVER_MEMORY", args.driver_memory)
    say(f"load average {load_average()} on {os.cpu_count()} cores")

    with scratch_dir("stratum-bench-batch-", args.keep) as work, \
            LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        say(f"Kafka and S3 up on free ports (data in {work})")
        env = {**stack.environment("bench"),
               "UPDATES_TOPIC": "bench-model-updates"}
        settings = Settings.from_env(env)
        from batch.spark import get_session

        started = time.perf_counter()
        spark = get_session(app_name="stratum-bench-batch")
        session_s = time.perf_counter() - started
        say(f"Spark session in {session_s:.1f}s (paid once per run, not in the per-row cost)")
        runs, warmup_s = [], None
        try:
            if args.warmup_rows:
                warm = run_size(args.warmup_rows, settings, spark, args, repeats=1,
                                compare=False)
                warmup_s = warm["job_seconds"]
                say(f"warm-up run: {warmup_s:.1f}s for {args.warmup_rows} rows (first job of "
                    "the process: JIT, Python workers, torch thread pools)")
            for n in sizes:
                runs.append(run_size(n, settings, spark, args, repeats=args.repeats,
                                     compare=True))
        finally:
            spark.stop()

    configured = job_config(settings, args, "")
    trained = configured.train_config()
    figures: dict[str, Any] = {
        "sizes": sizes, "epochs": trained.epochs, "hidden": list(trained.hidden),
        "dropout": trained.dropout, "patience": trained.patience,
        "batch_size": trained.batch_size, "lr": trained.lr,
        "threads": configured.threads, "cores": os.cpu_count(),
        "load_average_end": load_average(),
        "spark_session_seconds": round(session_s, 2), "warmup_seconds": warmup_s,
        "runs": runs,
        "job_us_per_row": [r["job_us_per_row"] for r in runs],
        "job_cost_per_row_spread": spread([r["job_us_per_row"] for r in runs]),
        "data_us_per_row": [r["data_us_per_row"] for r in runs],
        "data_cost_per_row_spread": spread([r["data_us_per_row"] for r in runs]),
        "train_us_per_row_epoch": [r["train_us_per_row_epoch"] for r in runs],
        "train_ratio": [r["training"]["ratio"] for r in runs],
        "train_ratio_same_work": [r["training"]["ratio_same_work"] for r in runs],
        "train_ratio_max": max((r["training"]["ratio"] for r in runs), default=None),
    }
    stage_costs = {stage: [r["us_per_row"].get(stage, 0.0) for r in runs]
                   for stage in DATA_STAGES}
    figures["stage_us_per_row"] = stage_costs
    figures["stage_cost_per_row_spread"] = {st: spread(v) for st, v in stage_costs.items()}
    if len(runs) >= 2:
        rows = [r["rows"] for r in runs]
        fits = {}
        for stage in DATA_STAGES:
            fixed, per_row = linear_fit(rows, [r["seconds"].get(stage, 0.0) for r in runs])
            fits[stage] = {"fixed_seconds": round(fixed, 3),
                           "us_per_row": round(1e6 * per_row, 3)}
        fixed, per_row = linear_fit(rows, [r["data_seconds"] for r in runs])
        net = [round(1e6 * (r["data_seconds"] - fixed) / r["rows"], 3) for r in runs]
        # What each added row cost from one size to the next: no fixed part in it.
        marginal = [round(1e6 * (b["data_seconds"] - a["data_seconds"])
                          / (b["rows"] - a["rows"]), 3) for a, b in zip(runs, runs[1:])]
        figures.update({
            "data_stage_fit": fits,
            "data_fixed_seconds": round(fixed, 3),
            "data_us_per_row_fit": round(1e6 * per_row, 3),
            # The data stages' cost per row once their fixed part is taken out, per size.
            "data_us_per_row_net_of_fixed": net,
            "data_net_cost_per_row_spread": spread(net),
            "data_marginal_us_per_row": marginal,
            "data_marginal_cost_per_row_spread": spread(marginal),
        })
    say("per-row cost of the data stages, us/row at " + ", ".join(str(n) for n in sizes)
        + " rows (spread)" + (", and the fitted fixed seconds + us/row" if len(runs) >= 2
                              else ""))
    for stage in DATA_STAGES:
        fit = figures.get("data_stage_fit", {}).get(stage)
        say(f"  {stage:<18} " + " ".join(f"{v:>8.3f}" for v in stage_costs[stage])
            + f"  ({figures['stage_cost_per_row_spread'][stage]})"
            + (f"  {fit['fixed_seconds']:.2f}s + {fit['us_per_row']:.3f} us/row" if fit else ""))
    say("size      job s  us/row  data s  data us/row  train us/row/epoch  train ratio "
        "(same work)")
    for r in runs:
        say(f"{r['rows']:>9} {r['job_seconds']:>6.1f} {r['job_us_per_row']:>7.2f} "
            f"{r['data_seconds']:>7.1f} {r['data_us_per_row']:>12.2f} "
            f"{r['train_us_per_row_epoch']:>19.2f} {r['training']['ratio']:>12.3f} "
            f"({r['training']['ratio_same_work']})")
    say(f"cost per row spread: job {figures['job_cost_per_row_spread']}, data stages "
        f"{figures['data_cost_per_row_spread']}")
    if len(runs) >= 2:
        say(f"data stages = {figures['data_fixed_seconds']}s fixed + "
            f"{figures['data_us_per_row_fit']} us/row; net of the fixed part "
            f"{figures['data_us_per_row_net_of_fixed']} us/row (spread "
            f"{figures['data_net_cost_per_row_spread']}); marginal cost from size to size "
            f"{figures['data_marginal_us_per_row']} us/row (spread "
            f"{figures['data_marginal_cost_per_row_spread']})")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

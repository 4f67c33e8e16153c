"""Command line of the batch layer.

Usage::

    python -m batch run [--data URI] [--model NAME] [--force] [--id-col id] [--label-col label]
                        [--task auto|classification|regression] [--metric M]
                        [--network mlp|package.module:function] [--network-params JSON]
                        [--epochs N] [--hidden 500,1000,500] [--lr 0.0003:0.01] [--seed N]
                        [--candidates N] [--search random|grid] [--distributed N] ...
    python -m batch schedule [run options]     # run at BATCH_CRON, never overlapping
    python -m batch score --data URI --out URI [--model NAME] [--version V] [--id-col id]

Exit status of ``run``: 0 published, 3 rejected by the evaluation policy, 1 on failure (with a
one-line ``batch: error: ...`` on stderr), another run holding the model's lock included; every
run also sends a record of itself to the metrics topic (:mod:`batch.runlog`).
The demo's data and the bootstrap of a first model are ``python -m demo`` (not installed).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from datetime import datetime
from typing import Any, Sequence

__all__ = ["main", "build_parser", "add_run_options", "job_config", "print_summary",
           "error_reason"]

log = logging.getLogger("batch")


def _say(line: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[batch {stamp}] {line}", flush=True)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    spec = "a value, alternatives a|b or a range low:high"
    parser.add_argument("--data", metavar="URI",
                        help="Parquet dataset to train on (default: LAKE_URI)")
    parser.add_argument("--model", metavar="NAME", help="model name (default: MODEL_NAME)")
    parser.add_argument("--force", action="store_true", default=None,
                        help="publish even if the evaluation policy rejects the candidate")
    parser.add_argument("--id-col", default=None, help="id column (BATCH_ID_COL, default id)")
    parser.add_argument("--label-col", default=None,
                        help="label column (BATCH_LABEL_COL, default label)")
    parser.add_argument("--task", choices=("auto", "classification", "regression"),
                        help="what the model predicts (BATCH_TASK, default auto: from the "
                             "label column)")
    parser.add_argument("--metric", choices=("auto", "accuracy", "auc", "log_loss", "rmse",
                                             "mae", "r2"),
                        help="test metric compared with the active model (BATCH_METRIC, "
                             "default auto: accuracy or rmse by the task)")
    parser.add_argument("--network", metavar="FACTORY",
                        help="network to train: mlp or package.module:function (BATCH_MODEL, "
                             "default mlp)")
    parser.add_argument("--network-params", metavar="JSON",
                        help="keyword parameters of the network's factory, a JSON object "
                             "(BATCH_MODEL_PARAMS)")
    parser.add_argument("--epochs", help=f"maximum epochs: {spec} (BATCH_EPOCHS, default auto)")
    parser.add_argument("--hidden", metavar="SIZES",
                        help="hidden layer sizes, e.g. 500,1000,500; alternatives 64,32|128 "
                             "(BATCH_HIDDEN, default auto)")
    parser.add_argument("--dropout", help=f"dropout: {spec} (BATCH_DROPOUT, default auto)")
    parser.add_argument("--batch-size", help=f"mini-batch rows: {spec} (BATCH_BATCH_SIZE, default auto)")
    parser.add_argument("--lr", help=f"Adam learning rate: {spec} (BATCH_LR, default 1e-3)")
    parser.add_argument("--seed", type=int, help="seed of split, search and training "
                                                 "(BATCH_SEED)")
    parser.add_argument("--candidates", type=int,
                        help="hyper-parameter candidates to train (BATCH_CANDIDATES)")
    parser.add_argument("--search", choices=("random", "grid"),
                        help="hyper-parameter search (BATCH_SEARCH, default random)")
    parser.add_argument("--parallelism", type=int,
                        help="candidates trained at once (BATCH_PARALLELISM; 0 = by threads)")
    parser.add_argument("--threads", type=int, help="torch threads in all (BATCH_THREADS)")
    parser.add_argument("--distributed", type=int, metavar="N",
                        help="train on N Spark tasks with TorchDistributor (BATCH_DISTRIBUTED)")
    parser.add_argument("--window-days", type=int,
                        help="train on the last N days only (BATCH_WINDOW_DAYS; 0 = all)")
    parser.add_argument("--max-train-seconds", type=float,
                        help="training time budget per candidate (BATCH_MAX_TRAIN_SECONDS)")
    parser.add_argument("--keep-versions", type=int,
                        help="generations to keep in the registry (BATCH_KEEP_VERSIONS)")
    parser.add_argument("--no-compare", dest="compare_active", action="store_false",
                        default=None, help="do not require the candidate to be at least as "
                                           "good as the active model")
    parser.add_argument("--no-announce", dest="announce", action="store_false", default=None,
                        help="publish without sending a MODEL-REF to Kafka")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m batch`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m batch",
                                     description="Stratum batch layer: rebuild and publish a "
                                                 "model from the lake.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="rebuild the model once now")
    add_run_options(run)
    schedule = commands.add_parser("schedule", help="run at BATCH_CRON, never overlapping")
    add_run_options(schedule)
    score = commands.add_parser("score", help="score a Parquet dataset with a registry version "
                                              "and write Parquet predictions")
    score.add_argument("--data", metavar="URI", required=True, help="Parquet dataset to score")
    score.add_argument("--out", metavar="URI", required=True,
                       help="where the prediction files go (an empty location)")
    score.add_argument("--model", metavar="NAME", help="model name (default: MODEL_NAME)")
    score.add_argument("--version", help="registry version (default: the one serving)")
    score.add_argument("--id-col", default=None, help="id column (BATCH_ID_COL, default id)")
    score.add_argument("-v", "--verbose", action="store_true", help="log details")
    return parser


def job_config(args: argparse.Namespace, settings: Any) -> Any:
    from batch.job import JobConfig

    return JobConfig.from_settings(
        settings, data_uri=args.data, model_name=args.model, force=args.force,
        id_col=args.id_col, label_col=args.label_col, task=args.task, metric=args.metric,
        network=args.network, network_params=args.network_params,
        epochs=args.epochs, hidden=args.hidden,
        dropout=args.dropout, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        candidates=args.candidates, search=args.search, parallelism=args.parallelism,
        threads=args.threads, distributed=args.distributed, window_days=args.window_days,
        max_train_seconds=args.max_train_seconds, keep_versions=args.keep_versions,
        compare_active=args.compare_active, announce=args.announce)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = indent + "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, indent + "  ".join("-" * w for w in widths)]
    out += [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return out


def print_summary(result: Any) -> None:
    """The end-of-run table: data, candidates, decision, version and time per stage."""
    from batch.search import describe

    rows = result.rows
    lines = [
        "summary",
        f"  model       {result.model_name}"
        + (f" version {result.ref.version}" if result.ref else " (not published)"),
        f"  decision    {'published' if result.published else 'rejected'}"
        + (" (forced)" if result.forced else "") + f": {result.decision.reason}",
        f"  data        {result.data_uri}",
        f"  rows        read {rows['read']}, usable {rows['usable']} (train {rows['train']}, "
        f"val {rows['val']}, test {rows['test']})",
        f"  features    {len(result.features)}"
        + (f" ({len(result.constant_features)} constant)" if result.constant_features else ""),
        f"  task        {result.task}, compared on {result.metric}",
        (f"  classes     {len(result.classes)}: {result.classes}"
         if result.task == "classification" else
         f"  label       {_label_line(result.training.get('label_stats') or {})}"),
        f"  active      {result.active_version or 'none'}"
        + (" (on the same test rows: " + ", ".join(
            f"{k} {v:.4f}" for k, v in result.active_metrics.items() if isinstance(v, float))
           + ")" if result.active_metrics else ""),
    ]
    if result.ref:
        lines.insert(2, f"  manifest    {result.ref.manifest_uri}")
    if result.pruned:
        lines.append(f"  pruned      {', '.join(result.pruned)}")
    lines.append("  candidates")
    figures = (("rmse", "mae", "r2") if result.task == "regression"
               else ("accuracy", "log_loss", "auc"))
    table = []
    for c in result.candidates:
        table.append([("*" if c.chosen else " ") + str(c.index), describe(c.params),
                      _fmt(c.epochs_run, 2), c.stopped, _fmt(c.val_loss),
                      *[_fmt(c.test.get(name)) for name in figures], _fmt(c.seconds, 1)])
    headers = (["test rmse", "mae", "r2"] if result.task == "regression"
               else ["test acc", "log loss", "auc"])
    lines += _table(["#", "hyper-parameters", "epochs", "stopped", "val loss", *headers,
                     "seconds"], table, indent="    ")
    lines.append("  seconds per stage")
    lines += _table(list(result.timings), [[_fmt(v, 1) for v in result.timings.values()]],
                    indent="    ")
    print("\n".join(lines), flush=True)


def _label_line(stats: dict[str, Any]) -> str:
    train = stats.get("train")
    if not train:
        return "-"
    return (f"mean {train['mean']:.4g}, std {train['std']:.4g}, range {train['min']:.4g} to "
            f"{train['max']:.4g} (train)")


def _utc_now() -> str:
    from datetime import timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _record(settings: Any, record: dict[str, Any]) -> None:
    from batch.runlog import publish_run_record

    if not publish_run_record(settings, record):
        _say(f"could not send the run record to {settings.metrics_topic!r} "
             f"at {settings.bootstrap_servers}")


def _cmd_run(args: argparse.Namespace) -> int:
    from app.settings import Settings
    from batch.errors import LockError, LockLostError
    from batch.job import EXIT_FAILED, run_job

    settings = Settings.from_env()
    config = job_config(args, settings)
    started = _utc_now()
    model = config.model_name or settings.model_name
    try:
        result = run_job(settings, config, progress=_say)
    except Exception as exc:
        # Another run held the lock: this one did not start. A lock lost mid-run is a failure.
        status = ("skipped" if isinstance(exc, LockError) and not isinstance(exc, LockLostError)
                  else "failed")
        _record(settings, {
            "model": model, "status": status, "exit_code": EXIT_FAILED, "reason": error_reason(exc),
            "version": None, "timings": getattr(exc, "timings", {}), "started_at": started,
            "ended_at": _utc_now()})
        raise
    print_summary(result)
    _record(settings, {
        "model": model, "status": "published" if result.published else "rejected",
        "exit_code": result.exit_code, "reason": result.decision.reason,
        "forced": result.forced, "version": result.ref.version if result.ref else None,
        "metrics": result.metrics, "rows": result.rows, "timings": result.timings,
        "candidates": len(result.candidates), "started_at": started, "ended_at": _utc_now()})
    return result.exit_code


def _cmd_score(args: argparse.Namespace) -> int:
    from app.settings import Settings
    from batch.score import score_dataset

    settings = Settings.from_env()
    result = score_dataset(settings, args.data, args.out, model_name=args.model,
                           version=args.version, id_col=args.id_col,
                           factories=settings.model_factories, progress=_say)
    print(f"scored {result.rows} rows with {result.model_name}/{result.version} into "
          f"{result.out_uri} ({result.files} files) in {result.seconds:.1f}s: "
          f"{result.rows_per_second:.0f} rows/s")
    return 0


def _cmd_schedule(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from app.settings import Settings
    from batch.schedule import run_schedule

    cron = Settings.from_env().batch_cron
    # Each run is a child process: a crash or a leak in one run cannot take the scheduler down.
    run_argv = [sys.executable, "-m", "batch", "run", *argv[1:]]
    run_schedule(cron, lambda: subprocess.call(run_argv), progress=_say)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m batch``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # py4j logs every connection at INFO; it drowns everything else.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if not args.verbose:
        # aiokafka logs every failed connection attempt; the job says once what it means.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "score":
            return _cmd_score(args)
        return _cmd_schedule(args, argv)
    except KeyboardInterrupt:
        print("batch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the operator; details with --verbose
        log.debug("failure", exc_info=True)
        print(f"batch: error: {error_reason(exc)}", file=sys.stderr, flush=True)
        return 1


def error_reason(exc: BaseException) -> str:
    from app.errors import StratumError

    # Stratum's own errors (an update-topic MessageError included) and bad settings
    # (SettingsError is a ValueError) carry a complete one-line reason.
    if isinstance(exc, (StratumError, ValueError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("pyspark", "py4j")):
        from batch.spark import spark_error_reason
        return spark_error_reason(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

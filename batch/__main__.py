"""Command line of the batch layer.

Usage::

    python -m batch run [--data URI] [--model NAME] [--force] [--id-col id] [--label-col label]
                        [--epochs N] [--hidden 500,1000,500] [--seed N] ...
    python -m batch schedule [run options]     # run at BATCH_CRON, never overlapping
    python -m batch demo-data [--rows N] [--seed N] [--data URI]
    python -m batch bootstrap [--rows N] [run options]

Exit status of ``run``: 0 published, 3 rejected by the evaluation policy, 1 on failure (with a
one-line ``batch: error: ...`` on stderr); ``bootstrap`` exits 0 when a model exists afterwards.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from datetime import datetime
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("batch")


def _say(line: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[batch {stamp}] {line}", flush=True)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="URI",
                        help="Parquet dataset to train on (default: LAKE_URI)")
    parser.add_argument("--model", metavar="NAME", help="model name (default: MODEL_NAME)")
    parser.add_argument("--force", action="store_true", default=None,
                        help="publish even if the evaluation policy rejects the candidate")
    parser.add_argument("--id-col", default=None, help="id column (default: id)")
    parser.add_argument("--label-col", default=None, help="label column (default: label)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (BATCH_EPOCHS, default 3)")
    parser.add_argument("--hidden", metavar="SIZES",
                        help="hidden layer sizes, e.g. 500,1000,500 (BATCH_HIDDEN)")
    parser.add_argument("--dropout", type=float, help="dropout (BATCH_DROPOUT, default 0.4)")
    parser.add_argument("--batch-size", type=int,
                        help="mini-batch rows (BATCH_BATCH_SIZE, default 512)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (BATCH_LR, default 1e-3)")
    parser.add_argument("--seed", type=int, help="seed of split and training (BATCH_SEED)")
    parser.add_argument("--max-train-seconds", type=float,
                        help="training time budget (BATCH_MAX_TRAIN_SECONDS)")
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
    _add_run_options(run)
    schedule = commands.add_parser("schedule", help="run at BATCH_CRON, never overlapping")
    _add_run_options(schedule)
    demo = commands.add_parser("demo-data", help="write a demo dataset to the lake")
    demo.add_argument("--rows", type=int, default=None,
                      help="events to write (BATCH_DEMO_ROWS, default 100000)")
    demo.add_argument("--seed", type=int, default=0, help="generator seed")
    demo.add_argument("--start-id", type=int, default=0, help="first event id")
    demo.add_argument("--data", metavar="URI", help="where to write (default: LAKE_URI)")
    demo.add_argument("-v", "--verbose", action="store_true", help="log details")
    boot = commands.add_parser("bootstrap",
                               help="if the registry has no model: demo data if the lake is "
                                    "empty, then one run")
    boot.add_argument("--rows", type=int, default=None,
                      help="demo events if the lake is empty (BATCH_DEMO_ROWS)")
    _add_run_options(boot)
    return parser


def _job_config(args: argparse.Namespace) -> Any:
    from batch.job import JobConfig
    from batch.train import parse_hidden

    hidden = parse_hidden(args.hidden) if args.hidden is not None else None
    return JobConfig.from_env(
        data_uri=args.data, model_name=args.model, force=args.force, id_col=args.id_col,
        label_col=args.label_col, epochs=args.epochs, hidden=hidden, dropout=args.dropout,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        max_train_seconds=args.max_train_seconds, announce=args.announce)


def _summary(result: Any) -> None:
    lines = [
        "summary",
        f"  model       {result.model_name}"
        + (f" version {result.ref.version}" if result.ref else " (not published)"),
        f"  decision    {'published' if result.published else 'rejected'}"
        + (" (forced)" if result.forced else "") + f": {result.decision.reason}",
        f"  data        {result.data_uri}",
        f"  rows        read {result.rows['read']}, usable {result.rows['usable']} (train "
        f"{result.rows['train']}, val {result.rows['val']}, test {result.rows['test']})",
        f"  features    {len(result.features)}",
        f"  classes     {result.classes}",
        "  metrics     " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in result.metrics.items()),
        f"  training    {result.training['epochs_run']} epochs ({result.training['stopped']}), "
        f"hidden {list(result.manifest.architecture['hidden']) if result.manifest else '?'}",
        "  seconds     " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()),
    ]
    if result.ref:
        lines.insert(2, f"  manifest    {result.ref.manifest_uri}")
    print("\n".join(lines), flush=True)


def _cmd_run(args: argparse.Namespace) -> int:
    from app.settings import Settings
    from batch.job import run_job

    result = run_job(Settings.from_env(), _job_config(args), progress=_say)
    _summary(result)
    return result.exit_code


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    import os

    from app.settings import Settings
    from batch.job import DEFAULT_DEMO_ROWS, bootstrap

    rows = args.rows or int(os.environ.get("BATCH_DEMO_ROWS", DEFAULT_DEMO_ROWS))
    result = bootstrap(Settings.from_env(), _job_config(args), rows=rows,
                       seed=args.seed or 0, progress=_say)
    if result is not None:
        _summary(result)
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    import os

    from app.settings import Settings
    from batch.demo_data import write_lake

    settings = Settings.from_env()
    rows = args.rows or int(os.environ.get("BATCH_DEMO_ROWS", 100_000))
    uri = args.data or settings.lake_uri
    start = time.monotonic()
    files = write_lake(uri, settings.storage_options, rows, seed=args.seed,
                       start_id=args.start_id)
    _say(f"wrote {rows} demo events in {len(files)} files under {uri} "
         f"({time.monotonic() - start:.1f}s)")
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
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "bootstrap":
            return _cmd_bootstrap(args)
        if args.command == "demo-data":
            return _cmd_demo_data(args)
        return _cmd_schedule(args, argv)
    except KeyboardInterrupt:
        print("batch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the operator; details with --verbose
        log.debug("failure", exc_info=True)
        print(f"batch: error: {_reason(exc)}", file=sys.stderr, flush=True)
        return 1


def _reason(exc: BaseException) -> str:
    from app.settings import SettingsError
    from batch.errors import BatchError
    from models.errors import ModelError

    if isinstance(exc, (BatchError, ModelError, SettingsError, ValueError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("pyspark", "py4j")):
        from batch.spark import spark_error_reason
        return spark_error_reason(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

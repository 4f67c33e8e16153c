"""Command line of the demo.

Usage::

    python -m demo data [--rows N] [--seed N] [--start-id N] [--data URI]
    python -m demo bootstrap [--rows N] [batch run options]

``data`` writes Higgs-schema demo events into the lake (default ``LAKE_URI``). ``bootstrap``
gives a fresh installation its first model: when the registry has no version, it writes demo
data into an empty lake and runs the batch job once (``make run`` calls it); it exits 0 when a
model exists afterwards. The demo feed is ``python -m demo.feed``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from typing import Sequence

from app.settings import Settings
from batch.__main__ import add_run_options, error_reason, job_config, print_summary

__all__ = ["main", "build_parser"]

log = logging.getLogger("demo")


def _say(line: str) -> None:
    print(f"[demo {datetime.now().strftime('%H:%M:%S')}] {line}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m demo`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m demo",
                                     description="Stratum demo: data and a first model.")
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write a demo dataset to the lake")
    data.add_argument("--rows", type=int, default=None,
                      help="events to write (BATCH_DEMO_ROWS, default 100000)")
    data.add_argument("--seed", type=int, default=0, help="generator seed")
    data.add_argument("--start-id", type=int, default=0, help="first event id")
    data.add_argument("--data", metavar="URI", help="where to write (default: LAKE_URI)")
    data.add_argument("-v", "--verbose", action="store_true", help="log details")
    boot = commands.add_parser("bootstrap",
                               help="if the registry has no model: demo data if the lake is "
                                    "empty, then one batch run")
    boot.add_argument("--rows", type=int, default=None,
                      help="demo events if the lake is empty (BATCH_DEMO_ROWS)")
    add_run_options(boot)
    return parser


def _cmd_data(args: argparse.Namespace) -> int:
    from demo.data import write_lake

    settings = Settings.from_env()
    rows = args.rows or settings.batch_demo_rows
    uri = args.data or settings.lake_uri
    start = time.monotonic()
    files = write_lake(uri, settings.storage_options, rows, seed=args.seed,
                       start_id=args.start_id)
    _say(f"wrote {rows} demo events in {len(files)} files under {uri} "
         f"({time.monotonic() - start:.1f}s)")
    return 0


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from demo.bootstrap import bootstrap

    settings = Settings.from_env()
    rows = args.rows or settings.batch_demo_rows
    result = bootstrap(settings, job_config(args, settings), rows=rows, seed=args.seed or 0,
                       progress=_say)
    if result is not None:
        print_summary(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m demo``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        return _cmd_data(args) if args.command == "data" else _cmd_bootstrap(args)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; details with --verbose
        log.debug("failure", exc_info=True)
        print(f"demo: error: {error_reason(exc)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

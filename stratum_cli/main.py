"""``stratum``: the deployment at a glance, its models, predictions and topics.

Every command prints text for people, or JSON with ``--json`` for scripts. Exit status 0 on
success; 1 on any failure, with one line ``stratum: error: <reason>`` on stderr; 2 on bad
usage (argparse's own message).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TextIO

from stratum_cli import render
from stratum_cli.client import DEFAULT_URL, Answer, CliError, Client

#: Inputs per ``POST /predict`` request (the endpoint's limit).
PREDICT_BATCH = 1024
#: Seconds between the two ``/metrics`` samples that give predictions per second.
RATE_INTERVAL_S = 1.0
SCORED_METRIC = "stratum_events_scored_total"


# ---- status -------------------------------------------------------------------------------


def scored_total(metrics_text: str) -> float:
    """The sum of ``stratum_events_scored_total`` over its versions, in a /metrics text."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(SCORED_METRIC + "{") or line.startswith(SCORED_METRIC + " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return total


def table_rows(client: Client, name: str) -> dict[str, Any]:
    body = client.get(f"/tables/{name}/?limit=1000")
    return {str(row["key"]): row["value"] for row in body.get("rows", [])}


def collect_status(urls: Sequence[str], interval: float = RATE_INTERVAL_S) -> dict[str, Any]:
    """Ask every worker for readiness, models, tables and (with ``interval`` > 0) its
    predictions per second from two ``/metrics`` samples ``interval`` seconds apart."""
    workers: list[dict[str, Any]] = []
    scored: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    first: dict[str, tuple[float, float]] = {}
    for url in urls:
        client = Client(url)
        worker: dict[str, Any] = {"url": client.url}
        workers.append(worker)
        try:
            ready = client.request("GET", "/ready")
            worker["ready"] = ready.status == 200
            if not worker["ready"]:
                worker["ready_error"] = ready.error_line()
            worker["models"] = client.get("/models/")
            # Each table lives on the worker that holds its partition: merge them all.
            for key, value in table_rows(client, "scored_by_version").items():
                scored.setdefault(key, value)
            for key, value in table_rows(client, "quality_by_version").items():
                quality.setdefault(key, value)
            if interval > 0:
                first[client.url] = (time.monotonic(), scored_total(metrics(client)))
        except CliError as exc:
            worker["error"] = str(exc)
    if first:
        time.sleep(interval)
    for worker in workers:
        if worker["url"] not in first:
            continue
        started, before = first[worker["url"]]
        try:
            after = scored_total(metrics(Client(worker["url"])))
            worker["predictions_per_s"] = max(0.0, after - before) / (time.monotonic() - started)
        except CliError:
            worker["predictions_per_s"] = None
    rollout = next((w["models"]["rollout"] for w in workers
                    if "rollout" in (w.get("models") or {})), None)
    status: dict[str, Any] = {"workers": workers, "scored_by_version": scored,
                              "quality_by_version": quality}
    if rollout is not None:
        status["rollout"] = rollout
    return status


def metrics(client: Client) -> str:
    answer = client.request("GET", "/metrics")
    if not answer.ok or not isinstance(answer.body, str):
        raise CliError(answer.error_line())
    return answer.body


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    status = collect_status(args.urls, args.interval)
    down = [w for w in status["workers"] if w.get("error")]
    if len(down) == len(status["workers"]):
        raise CliError(down[0]["error"])
    emit(args, out, status, render.status_lines)
    if down:
        raise CliError(f"{len(down)} of {len(status['workers'])} workers unreachable: "
                       + ", ".join(w["url"] for w in down))
    return 0


# ---- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdminAction:
    """An operator action on ``stratum models``: what it POSTs where."""

    name: str
    help: str
    request: Callable[[argparse.Namespace], tuple[str, Any]]
    arguments: tuple[tuple[str, str], ...] = ()


#: ``stratum models <name>``, in help order. An action is one function returning the
#: endpoint and the body (for example ``promote``: ``("/models/promote", {...})``).
ADMIN_ACTIONS: dict[str, AdminAction] = {}


def admin_action(name: str, help: str, *arguments: tuple[str, str]
                 ) -> Callable[[Callable[[argparse.Namespace], tuple[str, Any]]],
                               Callable[[argparse.Namespace], tuple[str, Any]]]:
    def register(request: Callable[[argparse.Namespace], tuple[str, Any]]
                 ) -> Callable[[argparse.Namespace], tuple[str, Any]]:
        ADMIN_ACTIONS[name] = AdminAction(name, help, request, tuple(arguments))
        return request
    return register


@admin_action("pin", "serve VERSION on every worker whatever is announced later",
              ("version", "an announced version"))
def pin(args: argparse.Namespace) -> tuple[str, Any]:
    return "/models/pin", {"version": args.version}


@admin_action("unpin", "lift the pin: serve the newest announced version again")
def unpin(args: argparse.Namespace) -> tuple[str, Any]:
    return "/models/pin", {"version": None}


@admin_action("rollback", "pin the version announced before the one serving")
def rollback(args: argparse.Namespace) -> tuple[str, Any]:
    return "/models/rollback", None


def _decision(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if getattr(args, "version", None):
        body["version"] = args.version
    if getattr(args, "reason", None):
        body["reason"] = args.reason
    return body


@admin_action("promote", "end the rollout in progress: its candidate serves from now on",
              ("--version", "the candidate expected (refused when another is in rollout)"),
              ("--reason", "why, recorded with the decision on the update topic"))
def promote(args: argparse.Namespace) -> tuple[str, Any]:
    return "/models/promote", _decision(args)


@admin_action("abort", "end the rollout in progress: its candidate never serves",
              ("--version", "the candidate expected (refused when another is in rollout)"),
              ("--reason", "why, recorded with the decision on the update topic"))
def abort(args: argparse.Namespace) -> tuple[str, Any]:
    return "/models/abort", _decision(args)


def cmd_models(args: argparse.Namespace, out: TextIO) -> int:
    if args.action is None:
        emit(args, out, Client(args.urls[0]).get("/models/"), render.models_lines)
        return 0
    token = args.token or os.environ.get("ADMIN_TOKEN") or None
    if not token:
        raise CliError(f"'models {args.action}' needs the admin token: set ADMIN_TOKEN or "
                       "pass --token")
    path, body = ADMIN_ACTIONS[args.action].request(args)
    emit(args, out, Client(args.urls[0], token=token).post(path, body), render.models_lines)
    return 0


# ---- predict --------------------------------------------------------------------------------


def read_inputs(text: str, source: str) -> list[Any]:
    """Inputs from a JSON object, a JSON list, or JSON lines (one object per line)."""
    if not text.strip():
        raise CliError(f"{source}: no input")
    try:
        whole = json.loads(text)
    except ValueError:
        pass
    else:
        if isinstance(whole, dict):
            return [whole]
        if isinstance(whole, list) and whole:
            return whole
        raise CliError(f"{source}: expected a JSON object, a non-empty JSON list or JSON "
                       "lines")
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except ValueError as exc:
                raise CliError(f"{source}: line {number} is not JSON: {exc}") from None
    return items


def predict_all(client: Client, inputs: Sequence[Any],
                batch: int = PREDICT_BATCH) -> list[dict[str, Any]]:
    """POST /predict in batches of ``batch``; the predictions in input order."""
    predictions: list[dict[str, Any]] = []
    for start in range(0, len(inputs), batch):
        answer = client.request("POST", "/predict", list(inputs[start:start + batch]))
        if not answer.ok:
            body = answer.body
            if isinstance(body, dict) and isinstance(body.get("errors"), list):
                # Indexes of the whole input, not of this request.
                body = {**body, "errors": [
                    {**e, "index": e.get("index", 0) + start} if isinstance(e, dict) else e
                    for e in body["errors"]]}
            raise CliError(Answer(answer.status, body).error_line())
        predictions.extend(answer.body)
    return predictions


def cmd_predict(args: argparse.Namespace, out: TextIO) -> int:
    if args.file in (None, "-"):
        text, source = sys.stdin.read(), "stdin"
    else:
        try:
            with open(args.file, encoding="utf-8") as handle:
                text, source = handle.read(), args.file
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {args.file}: {exc}") from None
    predictions = predict_all(Client(args.urls[0]), read_inputs(text, source))
    if args.json:
        for prediction in predictions:
            out.write(json.dumps(prediction) + "\n")
    else:
        write_lines(out, render.predictions_table(predictions))
    return 0


# ---- tail -----------------------------------------------------------------------------------


def cmd_tail(args: argparse.Namespace, out: TextIO) -> int:
    from app.settings import Settings, SettingsError
    from stratum_cli.tail import read_topic

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    topic = settings.predictions_topic if args.what == "predictions" else settings.dlq_topic
    line = render.prediction_line if args.what == "predictions" else render.dead_letter_line
    try:
        for value in read_topic(settings, topic, args.from_beginning, args.n, args.timeout):
            text = value.decode("utf-8", "replace")
            if args.json:
                out.write(text.strip() + "\n")
            else:
                try:
                    message = json.loads(text)
                except ValueError:
                    message = None
                out.write((line(message) if isinstance(message, dict)
                           else f"(not a JSON object) {text[:render.RAW_SHOWN]}") + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a tail without -n ends.
    return 0


# ---- the command ----------------------------------------------------------------------------


def emit(args: argparse.Namespace, out: TextIO, body: Any,
         lines: Callable[[Any], list[str]]) -> None:
    if args.json:
        out.write(json.dumps(body) + "\n")
    else:
        write_lines(out, lines(body))


def write_lines(out: TextIO, lines: Sequence[str]) -> None:
    out.write("".join(line + "\n" for line in lines))


def parser() -> argparse.ArgumentParser:
    # The common options are accepted before and after the command (``stratum --json status``
    # and ``stratum status --json``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", action="append", default=argparse.SUPPRESS,
                        help=f"a worker's URL (env STRATUM_URL, comma-separated; default "
                        f"{DEFAULT_URL}); status asks every one given")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON (one object, or one per line) for scripts")
    top = argparse.ArgumentParser(prog="stratum", parents=[common],
                                  description="The command line of a Stratum deployment.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", parents=[common], help="the deployment at a glance")
    status.add_argument("--interval", type=float, default=RATE_INTERVAL_S,
                        help="seconds between the two /metrics samples of predictions/s "
                        "(0: skip)")
    status.set_defaults(run=cmd_status)

    models = commands.add_parser("models", parents=[common],
                                 help="announced versions; pin, unpin, rollback, promote, abort")
    models.set_defaults(run=cmd_models)
    actions = models.add_subparsers(dest="action", metavar="ACTION")
    for action in ADMIN_ACTIONS.values():
        sub = actions.add_parser(action.name, parents=[common], help=action.help)
        sub.add_argument("--token", default=argparse.SUPPRESS,
                         help="the admin token (default: env ADMIN_TOKEN)")
        for name, help_text in action.arguments:
            sub.add_argument(name, help=help_text)

    predict = commands.add_parser("predict", parents=[common],
                                  help="score inputs with POST /predict")
    predict.add_argument("--file", "-f", help="a JSON object, a JSON list or JSON lines "
                         "(default: stdin)")
    predict.set_defaults(run=cmd_predict)

    tail = commands.add_parser("tail", parents=[common],
                               help="print the messages of the output or dead-letter topic")
    tail.add_argument("what", choices=["predictions", "dlq"])
    tail.add_argument("--from-beginning", action="store_true",
                      help="every message kept on the topic, not only new ones")
    tail.add_argument("-n", type=int, default=None, metavar="N",
                      help="stop after N messages")
    tail.add_argument("--timeout", type=float, default=None, metavar="S",
                      help="stop after S seconds")
    tail.set_defaults(run=cmd_tail)
    return top


def urls_of(args: argparse.Namespace) -> list[str]:
    given = getattr(args, "url", None) or [os.environ.get("STRATUM_URL") or DEFAULT_URL]
    urls = [u.strip() for value in given for u in value.split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise CliError(f"bad worker URL {url!r}: expected http(s)://host:port")
    return urls or [DEFAULT_URL]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run ``stratum`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    out = out or sys.stdout
    args = parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    args.token = getattr(args, "token", None)
    if args.command == "tail" and args.n is not None and args.n < 0:
        print("stratum: error: -n must be 0 or more", file=sys.stderr)
        return 1
    try:
        args.urls = urls_of(args)
        status: int = args.run(args, out)
        return status
    except CliError as exc:
        out.flush()
        print(f"stratum: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``stratum tail ... | head``): nothing more to say.
        sys.stderr.close()
        return 0



"""The worker's HTTP endpoints (docs/contract.md): readiness, table state, models, predict, metrics.

Bad requests get a 4xx with a JSON ``{"error": ...}``; nothing answers with a stack trace.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestPayloadError
from faust import web

from serving.dashboard import aggregate, local_snapshot
from serving.metrics import prometheus_text
from serving.model_manager import model_manager, pin_message
from serving.scoring import feature_matrix, predictions_from
from serving.agent import scoring_executor, serving
from serving.tables import (CLASS_WINDOW_S, LATEST_CHANGELOG, latest_prediction,
                           latest_predictions, table_rows, table_size)
from app import app
from transport import protocol
from transport.schemas import InvalidEvent, ValidEvent, validate_value

settings = app.settings

__all__ = ["StratumView"]

log = logging.getLogger(__name__)

MAX_PREDICT_ITEMS = 1024
MAX_TABLE_ROWS = 1000
_LIMIT = re.compile(r"0*[0-9]{1,9}")
#: How long a pin request waits for this worker to act on it.
PIN_WAIT_S = 30.0
#: Marks a lookup one worker asks of another: answer from local rows only.
PEER_HEADER = "X-Stratum-Peer"
#: Names, on a prediction lookup's answer, the worker (its advertised URL) that holds the row.
WORKER_HEADER = "X-Stratum-Worker"
#: How long a lookup waits for the other workers.
PEER_TIMEOUT_S = 5.0
#: How long ``/dashboard.json`` waits for the other workers' shares (the page asks every 2 s).
DASHBOARD_PEER_TIMEOUT_S = 1.5
STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {"js": "text/javascript", "css": "text/css", "html": "text/html"}
STATIC_MAX_AGE_S = 3600


def _load_static() -> dict[str, tuple[bytes, str]]:
    """``serving/static/``'s files, read once: name -> (bytes, ETag)."""
    files = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.suffix.lstrip(".") in STATIC_TYPES:
            body = path.read_bytes()
            files[path.name] = (body, f'"{hashlib.sha256(body).hexdigest()[:16]}"')
    return files


STATIC = _load_static()


def _dashboard_page() -> str:
    """``dashboard.html`` with each file it names as ``/static/<name>?v=<its hash>``: a
    browser caches the files, and fetches them again once the worker serves other ones."""
    page = STATIC["dashboard.html"][0].decode()
    for name, (_, etag) in STATIC.items():
        page = page.replace(f'"/static/{name}"', f'"/static/{name}?v={etag.strip(chr(34))}"')
    return page


DASHBOARD_PAGE = _dashboard_page()


class StratumView(web.View):
    """A view whose unexpected failures answer JSON, logged with the request path."""

    async def dispatch(self, request: Any) -> Any:
        try:
            refused = self.refuse(request)
            if refused is not None:
                return refused
            return await super().dispatch(request)
        except HTTPException as exc:  # aiohttp's own refusals, e.g. a body over its 1 MiB limit
            if exc.status >= 500:
                log.error("%s %s failed: %s", request.method, request.path, exc.text)
            return self.error(exc.status, exc.text or exc.reason)
        except (RequestPayloadError, HttpProcessingError) as exc:
            # A body that cannot be read as sent: a Content-Encoding it does not have,
            # broken chunks, a connection closed half-way.
            cause = exc.__cause__ if isinstance(exc.__cause__, HttpProcessingError) else exc
            message = getattr(cause, "message", "") or str(cause)
            return self.error(400, f"cannot read the request body: {message}".strip())
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return self.error(500, "internal error; see the worker log")

    def refuse(self, request: web.Request) -> web.Response | None:
        """The error response for a request that may not use this endpoint, or None."""
        return None


# Registered before every other page: Faust mounts an index of its own at "/" after the app's
# pages, and aiohttp adds a route to the resource registered just before it when their paths
# match (two HEAD / routes: the web server would not start).
@app.page("/")
class Home(StratumView):
    """The dashboard: charts and tables of the whole group, read from ``/dashboard.json``
    every 2 seconds by the page's own script (``serving/static/dashboard.html``)."""

    async def get(self, request: web.Request) -> web.Response:
        return self.html(DASHBOARD_PAGE, headers={"Cache-Control": "no-cache"})


@app.page("/plain")
class Plain(StratumView):
    """A plain HTML view of this worker's serving tables (no script); refreshes itself every
    2 seconds."""

    async def get(self, request: web.Request) -> web.Response:
        return self.html(render_home())


@app.page("/static/{name}")
class Static(StratumView):
    """The dashboard's files (``serving/static/``): the page's script and style and the
    vendored uPlot, cached by the browser and revalidated by ETag."""

    async def get(self, request: web.Request, name: str) -> web.Response:
        if name not in STATIC or name == "dashboard.html":
            return self.error(404, f"no static file {name!r}")
        body, etag = STATIC[name]
        headers = {"ETag": etag, "Cache-Control": f"public, max-age={STATIC_MAX_AGE_S}"}
        if request.headers.get("If-None-Match") == etag:
            return self.bytes(b"", status=304, headers=headers)
        return self.bytes(body, content_type=STATIC_TYPES[name.rsplit(".", 1)[-1]],
                          headers=headers)


@app.page("/dashboard.json")
class Dashboard(StratumView):
    """The figures of the dashboard for the whole group: this worker's share and every other
    worker's, asked at its advertised URL (``DASHBOARD_PEER_TIMEOUT_S``); a worker that does
    not answer is listed as unreachable. Asked by a peer, a worker answers its own share."""

    async def get(self, request: web.Request) -> web.Response:
        mine = local_snapshot()
        if request.headers.get(PEER_HEADER) is not None:
            return self.json(mine)
        answers = await asyncio.gather(*[_ask_share(url) for url in _peer_urls()])
        return self.json(aggregate(mine, answers))


@app.page("/ready")
class Ready(StratumView):
    """200 with the serving version once a model is loaded and the worker consumes its
    partitions; 503 before, and while the group rebalances or tables recover."""

    async def get(self, request: web.Request) -> web.Response:
        model = model_manager.active
        if model is None:
            return self.json({"error": "no model loaded yet", "model_version": None},
                             status=503)
        if not serving.ready:
            return self.json({"error": "partitions are being assigned or tables recovered",
                              "model_version": model.version}, status=503)
        return self.json({"model_version": model.version})


@app.page("/tables/")
class TableList(StratumView):
    """Every table this worker holds: name, help and size."""

    async def get(self, request: web.Request) -> web.Response:
        return self.json({"tables": [
            {"name": name, "help": table.help, "size": table_size(name)}
            for name, table in sorted(app.tables.items())]})


@app.page("/tables/{name}/")
class TableDetail(StratumView):
    """This worker's rows of one table, newest first (``?limit=``, default 100)."""

    async def get(self, request: web.Request, name: str) -> web.Response:
        if name not in app.tables:
            return self.error(404, f"unknown table {name!r}", tables=sorted(app.tables))
        raw_limit = request.query.get("limit", "100")
        # Not str.isdigit: it holds for "²", which int() refuses, and for 5,000 digits,
        # which int() refuses too.
        if not _LIMIT.fullmatch(raw_limit) or int(raw_limit) > MAX_TABLE_ROWS:
            return self.error(400, f"limit must be an integer from 0 to {MAX_TABLE_ROWS}")
        return self.json(table_rows(name, int(raw_limit)))


@app.page("/predictions/{id}/")
class PredictionDetail(StratumView):
    """The latest prediction for an id, answered by the worker that holds it.

    A row lives in the table partition of the input event it answers, which the id alone
    does not name (the input may be keyed otherwise, or not at all). So a worker answers from
    its own rows, else asks every other worker that holds partitions of the table, each of
    which answers from its own rows only.
    """

    async def get(self, request: web.Request, id: str) -> web.Response:
        key = id.encode()
        prediction = latest_prediction(key)
        if prediction is not None:
            return self.bytes(prediction, content_type="application/json",
                              headers={WORKER_HEADER: settings.advertised_url})
        if request.headers.get(PEER_HEADER) is None:
            found = await _ask_peers(f"/predictions/{quote(id, safe='')}/")
            if found is not None:
                body, holder = found
                return self.bytes(body, content_type="application/json",
                                  headers={WORKER_HEADER: holder})
        return self.error(404, f"no prediction for id {id!r}")


def _peer_urls() -> list[str]:
    """The advertised URLs of the other workers that hold partitions of the serving tables."""
    me = settings.advertised_url  # the app advertises it as its canonical URL
    return sorted({url.rstrip("/") for url, topics in
                   app.router.table_metadata(latest_predictions.name).items()
                   if topics.get(LATEST_CHANGELOG) and url.rstrip("/") != me})


async def _ask_share(url: str) -> tuple[str, dict[str, Any] | None, str | None]:
    """A peer's share of the dashboard: (its URL, the share or None, why not)."""
    timeout = aiohttp.ClientTimeout(total=DASHBOARD_PEER_TIMEOUT_S)
    try:
        async with app.http_client.get(f"{url}/dashboard.json", headers={PEER_HEADER: "1"},
                                       timeout=timeout) as response:
            if response.status != 200:
                return url, None, f"answered {response.status}"
            share = orjson.loads(await response.read())
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as exc:
        return url, None, f"{type(exc).__name__}: {exc}".rstrip(": ")
    if not isinstance(share, dict) or not isinstance(share.get("url"), str):
        return url, None, "not a dashboard share"
    return url, share, None


async def _ask_peers(path: str) -> tuple[bytes, str] | None:
    """The first 200 body any other worker holding table partitions answers for ``path``,
    with the URL of the worker that answered."""
    peers = _peer_urls()
    if not peers:
        return None
    session = app.http_client
    timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)

    async def ask(url: str) -> tuple[bytes, str] | None:
        try:
            async with session.get(f"{url}{path}", headers={PEER_HEADER: "1"},
                                   timeout=timeout) as response:
                if response.status == 200:
                    return await response.read(), url
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("lookup at %s failed: %s", url, exc)
        return None

    for answer in asyncio.as_completed([ask(url) for url in peers]):
        found = await answer
        if found is not None:
            return found
    return None


@app.page("/models/")
class Models(StratumView):
    """The active version, history, last swap and last refusal."""

    async def get(self, request: web.Request) -> web.Response:
        return self.json(model_manager.describe())


class AdminView(StratumView):
    """An operator endpoint: 404 unless ADMIN_TOKEN is set, 401 without the right token."""

    def refuse(self, request: web.Request) -> web.Response | None:
        if not settings.admin_token:
            return self.error(404, "admin endpoints are disabled (ADMIN_TOKEN is not set)")
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        # aiohttp keeps header bytes that are not UTF-8 as surrogate escapes: compare bytes.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("utf-8", "surrogateescape"),
                settings.admin_token.encode()):
            return self.error(401, "missing or wrong bearer token",
                              headers={"WWW-Authenticate": "Bearer"})
        return None

    async def publish_pin(self, version: str | None,
                          rollback_from: str | None = None) -> web.Response:
        """Publish a PIN for every worker and answer once this worker has handled it."""
        sent = await app.producer.send_and_wait(
            settings.updates_topic, None,
            json.dumps(pin_message(version, rollback_from=rollback_from)).encode(),
            partition=0, timestamp=None, headers=None)
        handled = await model_manager.wait_for_offset(sent.offset, timeout=PIN_WAIT_S)
        body = model_manager.describe()
        if not handled:
            return self.error(504, f"pin published at offset {sent.offset} but not handled "
                              f"within {PIN_WAIT_S}s; see GET /models/", **body)
        return self.json(body)


@app.page("/models/pin")
class Pin(AdminView):
    """Pin a version on every worker (``{"version": null}`` lifts the pin)."""

    async def post(self, request: web.Request) -> web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return self.error(400, f"body is not JSON: {exc}")
        if not isinstance(payload, dict) or "version" not in payload:
            return self.error(400, 'body must be {"version": "<version>"} or {"version": null}')
        version = payload["version"]
        if version is not None and not isinstance(version, str):
            return self.error(400, "version must be a string or null")
        if version is not None:
            if version not in model_manager.ledger.announced:
                return self.error(404, f"version {version!r} was never announced",
                                  announced=list(model_manager.ledger.announced))
            if version in model_manager.ledger.refused:
                return self.error(409, f"version {version!r} was refused: "
                                  f"{model_manager.ledger.refused[version]}")
        return await self.publish_pin(version)


@app.page("/models/rollback")
class Rollback(AdminView):
    """Pin, on every worker, the version announced before the one serving now."""

    async def post(self, request: web.Request) -> web.Response:
        base = model_manager.base
        target = await model_manager.rollback_target()
        if base is None or target is None:
            return self.error(409, "nothing to roll back to: no version was announced "
                              "before the one serving" if base else "no model is serving")
        return await self.publish_pin(target, rollback_from=base.version)


class Decide(AdminView):
    """End the rollout in progress on every worker: ``PROMOTE`` or ``ABORT`` its candidate
    (``by`` ``"operator"``). The body may name the candidate (``{"version": ...}``, refused
    with 409 when it is not the one in rollout) and a ``reason``."""

    kind = protocol.PROMOTE

    async def post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            payload = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            return self.error(400, f"body is not JSON: {exc}")
        if not isinstance(payload, dict):
            return self.error(400, 'body must be {"version": "<candidate>", "reason": "..."} '
                              "or empty")
        version, reason = payload.get("version"), payload.get("reason", "")
        if (version is not None and not isinstance(version, str)) or \
                not isinstance(reason, str):
            return self.error(400, "version and reason must be strings")
        rollout = protocol.candidate(model_manager.ledger.topic)
        if rollout is None:
            return self.error(409, "no rollout in progress")
        if version is not None and version != rollout.version:
            return self.error(409, f"version {version!r} is not the candidate in rollout "
                              f"({rollout.version!r})")
        message = protocol.decision_message(
            self.kind, settings.model_name, rollout.version, "operator",
            reason or f"{self.kind.lower()} requested by an operator",
            at=int(time.time() * 1000))
        sent = await app.producer.send_and_wait(
            settings.updates_topic, None, orjson.dumps(message), partition=0, timestamp=None,
            headers=None)
        handled = await model_manager.wait_for_offset(sent.offset, timeout=PIN_WAIT_S)
        body = model_manager.describe()
        if not handled:
            return self.error(504, f"{self.kind} published at offset {sent.offset} but not "
                              f"handled within {PIN_WAIT_S}s; see GET /models/", **body)
        return self.json(body)


@app.page("/models/promote")
class Promote(Decide):
    """Promote the candidate in rollout: it serves on every worker from now on."""

    kind = protocol.PROMOTE


@app.page("/models/abort")
class Abort(Decide):
    """Abort the rollout: its candidate never serves (unless announced again)."""

    kind = protocol.ABORT


@app.page("/predict")
class Predict(StratumView):
    """Score one input object or a list of them synchronously with the active model."""

    async def post(self, request: web.Request) -> web.Response:
        model = model_manager.active
        if model is None:
            return self.error(503, "no model loaded yet")
        body = await request.read()
        # orjson, as the stream's validation: the same JSON is refused the same way (NaN,
        # numbers beyond float64, lone surrogates), and nesting is bounded (1,024 levels)
        # below Python's recursion limit.
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return self.error(400, f"body is not JSON: {exc}")
        single = isinstance(payload, dict)
        items = [payload] if single else payload
        if not isinstance(items, list) or not items:
            return self.error(400, "body must be an input object or a non-empty list of them")
        if len(items) > MAX_PREDICT_ITEMS:
            return self.error(413, f"at most {MAX_PREDICT_ITEMS} inputs per request")
        events: list[ValidEvent] = []
        errors: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            try:
                events.append(validate_value(item, model.features, model.classes, model.task))
            except InvalidEvent as exc:
                errors.append({"index": index, "error": str(exc)})
        if errors:
            return self.error(400, "invalid input", errors=errors)
        outputs = await asyncio.get_running_loop().run_in_executor(
            scoring_executor, model.outputs, feature_matrix(events, len(model.features)))
        predictions = predictions_from(model, events, outputs, int(time.time() * 1000))
        return self.json(predictions[0] if single else predictions)


@app.page("/metrics")
class Metrics(StratumView):
    """Prometheus text exposition of this worker's metrics."""

    async def get(self, request: web.Request) -> web.Response:
        return self.text(prometheus_text().decode(), content_type="text/plain; version=0.0.4")


#: Columns of the quality table in the web view, by task: (row field, heading).
QUALITY_COLUMNS = {
    "classification": (("accuracy", "accuracy"), ("rolling_accuracy", "rolling accuracy"),
                       ("log_loss", "log loss"), ("rolling_log_loss", "rolling log loss")),
    "regression": (("rmse", "RMSE"), ("rolling_rmse", "rolling RMSE"), ("mae", "MAE"),
                   ("rolling_mae", "rolling MAE"), ("r2", "R&sup2;")),
}


def render_home() -> str:
    """The HTML of ``GET /``: active model, class counts, versions, quality, latest
    predictions."""
    model = model_manager.active
    e = html.escape
    windows = table_rows("class_counts", MAX_TABLE_ROWS)["rows"]
    by_window: dict[tuple[float, float], dict[str, int]] = {}
    for row in windows:
        by_window.setdefault((row["window_start"], row["window_end"]), {})[row["key"]] = \
            row["value"]
    classes = sorted({k for counts in by_window.values() for k in counts})
    window_rows = "".join(
        f"<tr><td>{e(_clock(start))}&ndash;{e(_clock(end))}</td>"
        + "".join(f"<td>{counts.get(c, 0)}</td>" for c in classes) + "</tr>"
        for (start, end), counts in sorted(by_window.items(), reverse=True)[:15])
    regression = model is not None and model.task == "regression"
    if regression and not window_rows:
        window_rows = ("<tr><td>a regression: its predicted values are not counted per "
                       "class</td></tr>")
    versions = table_rows("scored_by_version", 50)["rows"]
    version_rows = "".join(f"<tr><td>{e(str(r['key']))}</td><td>{r['value']}</td></tr>"
                           for r in versions)
    quality = table_rows("quality_by_version", 20)["rows"]
    quality_tables = "".join(
        _quality_table(task, [r for r in quality
                              if r["value"].get("task", "classification") == task])
        for task in QUALITY_COLUMNS
        if any(r["value"].get("task", "classification") == task for r in quality))
    latest = table_rows("latest_predictions", 20)
    latest_rows = "".join(
        f"<tr><td>{e(str(r['key']))}</td>"
        f"<td>{e(_predicted(r['value'].get('predicted')))}</td>"
        f"<td>{e(', '.join(f'{p:.3f}' for p in r['value'].get('probabilities', [])))}</td>"
        f"<td>{e(str(r['value'].get('model_version')))}</td>"
        f"<td>{e(_clock(r['value'].get('ts', 0) / 1000))}</td></tr>"
        for r in latest["rows"])
    status = (f"serving <b>{e(settings.model_name)}</b> ({e(model.task)}) version "
              f"<b>{e(model.version)}</b>"
              if model else "<b>no model loaded yet</b> (waiting for an announcement)")
    refusal = model_manager.ledger.last_refusal
    refusal_html = (f"<p class=warn>last refused version {e(refusal.version)}: "
                    f"{e(refusal.reason or '')}</p>" if refusal else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>Stratum worker</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin-bottom:1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px}}
th{{background:#eee}}.warn{{color:#a00}}</style></head><body>
<h1>Stratum worker</h1><p>{status}</p>{refusal_html}
<h2>Predicted classes, {CLASS_WINDOW_S}-second windows (table class_counts)</h2>
<table><tr><th>window (UTC)</th>{''.join(f'<th>{e(c)}</th>' for c in classes)}</tr>
{window_rows or '<tr><td>no predictions yet</td></tr>'}</table>
<h2>Events scored per model version (table scored_by_version)</h2>
<table><tr><th>version</th><th>events</th></tr>{version_rows}</table>
<h2>Quality per model version on labelled events, predicted before learned
(table quality_by_version)</h2>
{quality_tables or '<table><tr><td>no labelled events yet</td></tr></table>'}
<h2>Latest predictions (table latest_predictions, {latest['size']} ids on this worker)</h2>
<table><tr><th>id</th><th>predicted</th><th>probabilities</th><th>version</th>
<th>at (UTC)</th></tr>{latest_rows}</table>
<p>JSON: <a href="/tables/">/tables/</a> &middot; <a href="/models/">/models/</a> &middot;
<a href="/metrics">/metrics</a> &middot; <a href="/ready">/ready</a></p>
</body></html>"""


def _quality_table(task: str, rows: list[dict[str, Any]]) -> str:
    """One task's rows of ``quality_by_version`` as an HTML table."""
    columns = QUALITY_COLUMNS[task]
    head = "".join(f"<th>{heading}</th>" for _, heading in columns)
    body = "".join(
        f"<tr><td>{html.escape(str(r['key']))}</td><td>{r['value']['n']}</td>"
        + "".join(f"<td>{_figure(r['value'].get(k))}</td>" for k, _ in columns) + "</tr>"
        for r in rows)
    return f"<table><tr><th>version</th><th>labelled</th>{head}</tr>{body}</table>"


def _predicted(value: Any) -> str:
    """A prediction's ``predicted`` as the web view shows it: a class, or a number."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _figure(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.4g}"


def _clock(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch_s))

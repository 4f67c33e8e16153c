"""The Faust App, built once from :class:`~app.settings.Settings`.

Agents, tables and web views live in the layer packages (``serving``, ``speed``) and are
found by autodiscovery; this module imports only settings, so every layer may import the App
and none is imported by it. A layer that must act before the worker consumes (the transport's
topic creation) registers a hook with :meth:`StratumApp.before_first_start`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlparse

import faust
from aiohttp import web as aiohttp_web

from app.settings import Settings, SettingsError

__all__ = ["StratumApp", "create_app", "load_settings", "app"]

log = logging.getLogger(__name__)


class StratumApp(faust.App):
    """A Faust App that knows its settings and runs its layers' hooks before consuming."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        self._first_start_hooks: list[Callable[[], Awaitable[None]]] = []
        super().__init__(settings.app_id, **kwargs)

    def before_first_start(
            self, hook: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Decorator: await ``hook`` when the worker starts, before any consumer subscribes."""
        self._first_start_hooks.append(hook)
        return hook

    async def on_first_start(self) -> None:
        for hook in self._first_start_hooks:
            await hook()
        Path(self.conf.datadir).mkdir(parents=True, exist_ok=True)
        await super().on_first_start()


@aiohttp_web.middleware
async def json_errors(request: aiohttp_web.Request, handler: Any) -> aiohttp_web.StreamResponse:
    """Answer routing errors (unknown path, wrong method) with JSON like every other error."""
    try:
        response: aiohttp_web.StreamResponse = await handler(request)
        return response
    except aiohttp_web.HTTPException as exc:
        if exc.status < 400:
            raise
        return aiohttp_web.json_response({"error": exc.reason}, status=exc.status)


def create_app(settings: Settings) -> StratumApp:
    """Build the Faust App for ``settings`` (no I/O happens until the worker starts)."""
    return StratumApp(
        settings,
        broker=settings.kafka_broker,
        autodiscover=["serving", "speed"],
        origin="app",
        store="memory://",
        datadir=str(Path(settings.data_dir) / settings.app_id),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        consumer_auto_offset_reset="earliest",
        web_bind=settings.web_bind,
        web_port=settings.web_port,
        web_host=urlparse(settings.advertised_url).hostname,
        # What the other workers are told to ask for this worker's table partitions.
        canonical_url=settings.advertised_url,
        # Stratum serves its own /, /tables/ and /metrics; Faust's debug pages stay off, and
        # so does its /router/ (lookups ask app.router in-process; over HTTP it answered an
        # unknown table with a 500).
        web_router_enabled=False,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_tables_enabled=False,
        web_application_options={"middlewares": [json_errors]},
        producer_linger_ms=5,
        # Room for a whole micro-batch of predictions per partition in one produce request.
        producer_max_batch_size=512 * 1024,
        producer_acks=-1,
        # A produce request the broker never answers fails after a minute (Faust's default
        # is 20): the micro-batch stays unacknowledged and its events are delivered again.
        producer_request_timeout=60.0,
        stream_buffer_maxsize=8192,
        broker_session_timeout=settings.worker_session_timeout_s,
        broker_commit_every=5000,
        broker_commit_interval=1.0,
        table_standby_replicas=0,
    )


def load_settings() -> Settings:
    """Settings from the environment; a bad value stops start-up naming the variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"stratum: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = create_app(load_settings())

"""The dashboard against a real worker while events flow: ``/dashboard.json`` tells what
``/tables/`` and ``/models/`` tell, and the page, rendered by headless Chromium, shows it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from app.settings import Settings
from devstack.harness import (WorkerProcess, announce, consume_until, deploy_small_model, http,
                              poll, produce, run)
from devstack.stack import free_port

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]
BATCHES, PER_BATCH = 20, 25
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Deployment:
    def __init__(self, settings: Settings, version: str, worker: WorkerProcess) -> None:
        self.settings, self.version, self.worker = settings, version, worker
        self.url = worker.url


@pytest.fixture(scope="module")
def deployment(settings_env: Callable[..., dict[str, str]],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = settings_env(SPEED_LAYER="0", ARCHIVE="0")
    settings, version = deploy_small_model(env, FEATURES, CLASSES)
    tmp = tmp_path_factory.mktemp("dashboard")
    worker = WorkerProcess(env, tmp / "worker.log").start()
    try:
        worker.wait_ready()
        # Something the worker refuses, for the timeline.
        run(announce(settings.bootstrap_servers, settings.updates_topic,
                     {"type": "MODEL-REF", "model": settings.model_name, "version": "nope"}))
        yield Deployment(settings, version, worker)
    finally:
        worker.stop()


def events(prefix: str, n: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}-{i}", "features": [i % 7, i % 3, 2],
                        "label": CLASSES[i % 2]}).encode() for i in range(n)]


def get(url: str) -> Any:
    status, body, _ = http("GET", url)
    assert status == 200, body
    return body


def test_dashboard_json_tells_what_the_tables_and_models_tell(deployment: Deployment) -> None:
    d = deployment
    bootstrap, topic = d.settings.bootstrap_servers, d.settings.events_topic

    def flow() -> None:
        for k in range(BATCHES):
            run(produce(bootstrap, topic, events(f"flow{k}", PER_BATCH)))
            time.sleep(0.4)

    feeder = threading.Thread(target=flow)
    feeder.start()
    try:
        # While events flow, the page's figures move: a rate above zero on this worker.
        seen = poll(lambda: get(f"{d.url}/dashboard.json"),
                    lambda b: any(r for r in b["predictions_per_s"]["total"] if r),
                    timeout=60)
        assert seen["workers"][0]["url"] == d.url and seen["workers"][0]["reachable"]
    finally:
        feeder.join()
    total = BATCHES * PER_BATCH
    run(consume_until(bootstrap, d.settings.predictions_topic, lambda vs: len(vs) >= total))

    # Once the tables and the samples caught up with every event:
    def settled() -> Any:
        scored = get(f"{d.url}/tables/scored_by_version/")["rows"]
        body = get(f"{d.url}/dashboard.json")
        quality = get(f"{d.url}/tables/quality_by_version/")["rows"]
        return scored, body, quality

    scored, body, quality = poll(
        settled, lambda s: (sum(r["value"] for r in s[0]) == total
                            and s[1]["workers"][0]["scored"] == total
                            and s[2] and s[2][0]["value"]["n"] == total
                            and s[1]["quality"]["now"]
                            and s[1]["quality"]["now"][0]["n"] == total),
        timeout=60)
    models = get(f"{d.url}/models/")
    assert body["models"]["active"] == models["active"] == d.version
    for key in ("model", "update_seq", "pinned", "refusals", "updates_applied", "last_swap",
                "last_refusal"):
        assert body["models"][key] == models[key], key
    assert body["timeline"] == sorted(models["history"], key=lambda r: r["at"], reverse=True)
    assert {r["kind"] for r in body["timeline"]} >= {"swap"}
    assert models["refusals"] >= 1 and any(r["kind"].startswith("refused")
                                           for r in body["timeline"])

    (worker,) = body["workers"]
    assert worker["active"] == d.version and worker["keeps_summaries"]

    counts = get(f"{d.url}/tables/class_counts/?limit=1000")["rows"]
    by_class: dict[str, int] = {}
    for row in counts:
        by_class[row["key"]] = by_class.get(row["key"], 0) + row["value"]
    mix = body["class_mix"]
    assert {c: sum(v) for c, v in mix["series"].items()} == by_class
    assert sum(by_class.values()) == total and mix["window_s"] == 60

    assert quality[0]["key"] == d.version
    now = body["quality"]["now"][0]
    assert now["version"] == d.version and now["figure"] == "rolling_accuracy"
    assert now["value"] == pytest.approx(quality[0]["value"]["rolling_accuracy"])
    assert d.version in body["quality"]["series"]
    assert body["quality"]["t"] and body["predictions_per_s"]["t"]

    latest = get(f"{d.url}/tables/latest_predictions/?limit=20")["rows"]
    assert [p["id"] for p in body["latest"]][:5] == [r["key"] for r in latest][:5]
    assert all(p["model_version"] == d.version and p["worker"] == d.url
               for p in body["latest"])
    # Event-to-prediction latency, sampled while the events flowed: every one counted once.
    latency = body["latency"]
    assert latency["unit"] == "ms" and latency["t"] and set(latency["p50"]) == {d.url}
    pairs = [(p50, p99) for p50, p99 in zip(latency["p50"][d.url], latency["p99"][d.url])
             if p50 is not None]
    assert pairs and all(0 < p50 <= p99 < 60_000 for p50, p99 in pairs), pairs
    assert 0 < worker["latency_p50_ms"] <= worker["latency_p99_ms"]
    metrics = http("GET", f"{d.url}/metrics")[1]
    assert f"stratum_event_latency_seconds_count {float(total)}" in metrics

    # No candidate was ever announced: no rollout.
    assert body["rollout"] is None and models["rollout"] is None

    # The page and its files.
    status, page, ctype = http("GET", f"{d.url}/")
    assert status == 200 and ctype.startswith("text/html") and "/dashboard.json" in page
    assert re.search(r'"/static/dashboard\.js\?v=[0-9a-f]{16}"', page)  # a new file, a new URL
    status, script, ctype = http("GET", f"{d.url}/static/uPlot.iife.min.js")
    assert status == 200 and ctype.startswith("text/javascript") and "uPlot" in script
    assert http("GET", f"{d.url}/static/nope.js")[0] == 404
    status, plain, _ = http("GET", f"{d.url}/plain")
    assert status == 200 and d.version in plain


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--disable-background-networking",
                           "--disable-dev-shm-usage", "--virtual-time-budget=5000", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH "
                    "(apt-get install chromium)")
def test_the_page_renders_charts_and_the_figures_of_models(deployment: Deployment,
                                                           tmp_path: Path) -> None:
    d = deployment
    run(produce(d.settings.bootstrap_servers, d.settings.events_topic, events("page", 50)))
    models = get(f"{d.url}/models/")
    dom = chromium("--dump-dom", f"{d.url}/").stdout
    assert "data-rendered=" in dom, dom[-2000:]  # the script ran and rendered an answer

    def cell(element_id: str) -> str:
        found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
        assert found, element_id
        return found.group(1)

    assert cell("active-version") == models["active"] == d.version
    assert cell("model-name") == models["model"]
    assert cell("refusals") == str(models["refusals"])
    assert cell("updates-applied") == str(models["updates_applied"])
    assert cell("worker-count") == "1 of 1 answering"
    # Four uPlot charts, each drawn on a canvas.
    for chart in ("chart-rate", "chart-latency", "chart-classes", "chart-quality"):
        block = dom.split(f'id="{chart}"', 1)[1].split("</section>", 1)[0]
        assert "<canvas" in block and "uplot" in block, chart
    # No rollout: the panel says so, its details stay hidden.
    assert re.search(r'id="rollout-body"[^>]*hidden', dom)
    assert not re.search(r'id="rollout-none"[^>]*hidden', dom)
    timeline = dom.split('id="timeline"', 1)[1].split("</table>", 1)[0]
    assert timeline.count("<tr") - 1 == len(models["history"])  # header row + one per entry
    assert "nope" in timeline
    latest = dom.split('id="latest"', 1)[1].split("</table>", 1)[0]
    assert d.version in latest and ("flow" in latest or "page" in latest)

    shot = tmp_path / "dashboard.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1400,1500",
                    "--hide-scrollbars", f"{d.url}/")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr[-2000:]


def test_the_dashboard_of_either_worker_shows_both_and_a_silent_one_as_unreachable(
        settings_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    env = settings_env(SPEED_LAYER="0", ARCHIVE="0", TOPIC_PARTITIONS="4")
    settings, version = deploy_small_model(env, FEATURES, CLASSES)
    workers = [WorkerProcess({**env, "WEB_PORT": str(free_port()),
                              "STRATUM_DATA_DIR": str(tmp_path / f"w{k}")},
                             tmp_path / f"w{k}.log") for k in range(2)]
    urls = [w.url for w in workers]
    try:
        for worker in workers:
            worker.start().wait_ready()
        n = 400
        run(produce(settings.bootstrap_servers, settings.events_topic, events("two", n)))
        run(consume_until(settings.bootstrap_servers, settings.predictions_topic,
                          lambda vs: len(vs) >= n))

        def both() -> list[Any]:
            return [get(f"{url}/dashboard.json") for url in urls]

        def settled(bodies: list[Any]) -> bool:
            return all(len(b["workers"]) == 2 and all(w["reachable"] for w in b["workers"])
                       and sum(w["scored"] or 0 for w in b["workers"]) == n
                       and sum(sum(v) for v in b["class_mix"]["series"].values()) == n
                       for b in bodies)

        bodies = poll(both, settled, timeout=90)
        for url, body in zip(urls, bodies):
            assert body["worker"] == url
            assert {w["url"] for w in body["workers"]} == set(urls)
            assert [w["self"] for w in body["workers"]] == [True, False]
            assert all(w["active"] == version for w in body["workers"])
            # Each worker's count is what its own /metrics counts.
            for w in body["workers"]:
                metrics = http("GET", f"{w['url']}/metrics")[1]
                counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                              if line.startswith("stratum_events_scored_total{"))
                assert w["scored"] == counted
            assert sum(1 for w in body["workers"] if w["keeps_summaries"]) == 1
            # The group's figures, whichever worker is asked (one of them keeps the counts).
            assert len(body["predictions_per_s"]["series"]) == 2
        assert all(w["scored"] for w in bodies[0]["workers"])  # both serve partitions

        # A worker that stops answering (stopped, not gone: still in the group) is listed as
        # unreachable, and the dashboard still answers, within the peer timeout.
        assert workers[1].proc is not None
        os.killpg(workers[1].proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            body = get(f"{urls[0]}/dashboard.json")
            took = time.monotonic() - started
        finally:
            os.killpg(workers[1].proc.pid, signal.SIGCONT)
        assert took < 5, took
        silent = [w for w in body["workers"] if w["url"] == urls[1]]
        assert silent and not silent[0]["reachable"] and silent[0]["error"]
        assert body["workers"][0]["reachable"] and body["workers"][0]["url"] == urls[0]
    finally:
        for worker in workers:
            if worker.proc is not None:
                worker.stop()

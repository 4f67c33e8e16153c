"""The ``stratum`` command: its views on their own, and every command against a real worker.

The integration tests share one worker (module scope) serving the second of two announced
versions, with ``ADMIN_TOKEN`` set so that pin, unpin and rollback work; they run the command
in-process (``main(argv)``) and, once each, as ``python -m stratum_cli``, which is what the
installed ``stratum`` console script runs.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from app.settings import Settings
from devstack.harness import (REPO, WorkerProcess, announce, consume_until, http, poll,
                              produce, publish_small_model, run)
from devstack.stack import free_port
from models.registry import Registry
from stratum_cli import render
from stratum_cli.client import Answer, CliError
from stratum_cli.main import main, predict_all, read_inputs, scored_total
from transport.topics import ensure_topics

FEATURES = ["a", "b", "c"]
CLASSES = ["b", "s"]
TOKEN = "cli-admin-token"


def stratum(*argv: str) -> tuple[int, str]:
    """Run ``main(argv)``; its exit status and what it printed on stdout."""
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def events(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "features": {"a": i % 7, "b": i / 10, "c": None},
             **({"label": CLASSES[i % 2]} if i % 2 == 0 else {})} for i in range(n)]


# ---- the views, on their own ----------------------------------------------------------------


def test_scored_total_sums_the_versions_of_the_counter() -> None:
    text = ("# HELP stratum_events_scored_total x\n"
            'stratum_events_scored_total{model_version="v1"} 10.0\n'
            'stratum_events_scored_total{model_version="v1+2"} 5.0\n'
            'stratum_events_scored_created{model_version="v1"} 1.7e9\n'
            "stratum_events_dead_lettered_total 3.0\n")
    assert scored_total(text) == 15.0
    assert scored_total("") == 0.0


def test_status_view() -> None:
    status = {
        "workers": [
            {"url": "http://w1:6066", "ready": True, "predictions_per_s": 12.34,
             "models": {"model": "default", "task": "classification", "active": "v2+3",
                        "base_version": "v2", "update_seq": 3, "pinned": None,
                        "last_swap": {"version": "v2", "at": 0, "kind": "swap", "load_s": 0.5},
                        "last_refusal": {"version": "v0", "at": 60, "kind": "refused model",
                                         "reason": "checksum"}}},
            {"url": "http://w2:6066", "error": "cannot reach the worker at http://w2:6066"}],
        "scored_by_version": {"v2": 100, "v2+3": 7},
        "quality_by_version": {
            "v2": {"task": "classification", "n": 50, "accuracy": 0.8, "log_loss": 0.41,
                   "rolling_accuracy": 0.81, "rolling_log_loss": 0.4},
            "r1": {"task": "regression", "n": 9, "rmse": 1.5, "mae": 1.0, "r2": None,
                   "rolling_rmse": 1.4}},
        "rollout": {"candidate": "v3", "share": 0.1},
    }
    text = "\n".join(render.status_lines(status))
    assert "worker http://w1:6066: ready" in text
    assert "serving       v2+3 (base v2, update 3)" in text
    assert "pinned        no" in text
    assert "swap v2 at 1970-01-01 00:00:00Z (loaded in 0.50s)" in text
    assert "refused model v0 at 1970-01-01 00:01:00Z: checksum" in text
    assert "predictions/s 12.3" in text
    assert "worker http://w2:6066: unreachable" in text
    assert "v2+3     7" in text
    assert "ACCURACY" in text and "0.8000" in text and "0.4100" in text
    assert "RMSE" in text and "1.5000" in text
    assert "rollout" in text and "candidate  v3" in text and "share      0.1000" in text
    # Without a rollout key, no rollout section; not ready shows why.
    del status["rollout"]
    status["workers"][0].update(ready=False, ready_error="HTTP 503: no model loaded yet")
    text = "\n".join(render.status_lines(status))
    assert "rollout" not in text and "not ready (HTTP 503: no model loaded yet)" in text


def test_models_view() -> None:
    models = {"model": "default", "task": "classification", "active": "v2+1",
              "base_version": "v2", "pinned": "v2", "announced": ["v1", "v2", "v3"],
              "refused": {"v3": "reference rows not reproduced", "v9": "cannot read"}}
    lines = render.models_lines(models)
    assert lines[0] == "model default (classification): serving v2+1, pinned v2"
    text = "\n".join(lines)
    assert "v1       -" in text
    assert "v2       serving as v2+1, pinned" in text
    assert "v3       refused: reference rows not reproduced" in text
    assert "v9       refused: cannot read" in text
    assert "no version announced" in "\n".join(render.models_lines(
        {"model": "m", "announced": [], "refused": {}, "active": None}))


def test_prediction_views() -> None:
    classified = [{"id": "e-1", "model_version": "v1", "predicted": "s",
                   "probabilities": [0.25, 0.75], "ts": 1763910062512}]
    lines = render.predictions_table(classified)
    assert lines[0].split() == ["ID", "PREDICTED", "P", "VERSION"]
    assert lines[1].split() == ["e-1", "s", "0.7500", "v1"]
    regression = [{"id": "r-1", "model_version": "v1", "predicted": 41.37, "ts": 0},
                  {"id": "r-2", "model_version": "v1", "predicted": None, "ts": 0}]
    lines = render.predictions_table(regression)
    assert lines[0].split() == ["ID", "PREDICTED", "VALUE", "VERSION"]
    assert lines[1].split() == ["r-1", "41.3700", "41.3700", "v1"]
    assert lines[2].split() == ["r-2", "-", "-", "v1"]
    assert render.prediction_line(classified[0]) == (
        "2025-11-23 15:01:02Z e-1 predicted=s p=0.7500 version=v1")
    dead = {"error": "missing field 'features'", "raw": '{"id": "e-9"}' + "x" * 300,
            "source": {"topic": "events", "partition": 2, "offset": 41877}}
    line = render.dead_letter_line(dead)
    assert line.startswith("events[2]@41877 error=missing field 'features' raw=\"{")
    assert line.endswith('..."...') or line.endswith("...")


def test_inputs_from_an_object_a_list_or_json_lines() -> None:
    one = {"id": "a", "features": [1, 2, 3]}
    assert read_inputs(json.dumps(one), "f") == [one]
    assert read_inputs(json.dumps([one, one]), "f") == [one, one]
    assert read_inputs(f"{json.dumps(one)}\n\n{json.dumps(one)}\n", "f") == [one, one]
    with pytest.raises(CliError, match="f: line 2 is not JSON"):
        read_inputs(f"{json.dumps(one)}\n{{nope\n", "f")
    with pytest.raises(CliError, match="no input"):
        read_inputs("  \n", "f")
    with pytest.raises(CliError, match="expected a JSON object"):
        read_inputs("[]", "f")


def test_predict_batches_and_names_the_whole_input_index() -> None:
    class Fake:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def request(self, method: str, path: str, body: Any = None) -> Answer:
            self.sizes.append(len(body))
            bad = [i for i, item in enumerate(body) if item.get("bad")]
            if bad:
                return Answer(400, {"error": "invalid input",
                                    "errors": [{"index": i, "error": "nope"} for i in bad]})
            return Answer(200, [{"id": item["id"]} for item in body])

    fake = Fake()
    inputs = [{"id": str(i)} for i in range(2500)]
    assert [p["id"] for p in predict_all(fake, inputs)] == [str(i) for i in range(2500)]  # type: ignore[arg-type]
    assert fake.sizes == [1024, 1024, 452]
    inputs[1500]["bad"] = True
    with pytest.raises(CliError, match=r"^HTTP 400: invalid input: #1500: nope$"):
        predict_all(Fake(), inputs)  # type: ignore[arg-type]


def test_errors_are_one_line_with_status_1(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert stratum("status", "--url", url) == (1, "")
    err = capsys.readouterr().err
    assert err == (f"stratum: error: cannot reach the worker at {url}: connection refused "
                   "(is it running? set --url or STRATUM_URL)\n")
    monkeypatch.setenv("STRATUM_URL", url)
    assert stratum("models", "--json")[0] == 1
    assert url in capsys.readouterr().err
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    assert stratum("models", "rollback")[0] == 1
    assert capsys.readouterr().err == ("stratum: error: 'models rollback' needs the admin "
                                       "token: set ADMIN_TOKEN or pass --token\n")
    assert stratum("status", "--url", "localhost:6066")[0] == 1
    assert "bad worker URL" in capsys.readouterr().err


# ---- against a running worker ---------------------------------------------------------------


class Deployment:
    def __init__(self, env: dict[str, str], versions: list[str], worker: WorkerProcess
                 ) -> None:
        self.env, self.versions, self.worker = env, versions, worker
        self.settings = Settings.from_env(env)
        self.url = worker.url


@pytest.fixture(scope="module")
def deployment(settings_env: Any, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Deployment]:
    env = settings_env(SPEED_LAYER="0", ADMIN_TOKEN=TOKEN)
    settings = Settings.from_env(env)
    registry = Registry(settings.registry_uri, settings.storage_options)
    refs = [publish_small_model(registry, settings.model_name, FEATURES, CLASSES, seed=seed)
            for seed in (0, 1)]
    run(ensure_topics(settings))
    for ref in refs:
        run(announce(settings.bootstrap_servers, settings.updates_topic, ref.to_message()))
    worker = WorkerProcess(env, tmp_path_factory.mktemp("cli") / "worker.log").start()
    try:
        assert worker.wait_ready() == {"model_version": refs[1].version}
        yield Deployment(env, [ref.version for ref in refs], worker)
    finally:
        worker.stop()


@pytest.fixture
def in_deployment(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """The deployment's settings in this process's environment (as a shell would have them)."""
    for name, value in deployment.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STRATUM_URL", deployment.url)
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    return deployment


def cli_process(d: Deployment, *argv: str, stdin: str | None = None,
                **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **d.env, "STRATUM_URL": d.url, "PYTHONPATH": str(REPO), **extra}
    return subprocess.run([sys.executable, "-m", "stratum_cli", *argv], input=stdin,
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_status_and_models(in_deployment: Deployment) -> None:
    d = in_deployment
    v1, v2 = d.versions
    run(produce(d.settings.bootstrap_servers, d.settings.events_topic,
                [json.dumps(e).encode() for e in events(40, "status")]))
    poll(lambda: http("GET", f"{d.url}/tables/quality_by_version/")[1]["rows"],
         lambda rows: bool(rows) and rows[0]["value"]["n"] >= 20)

    status, out = stratum("status", "--json")
    assert status == 0
    body = json.loads(out)
    (worker,) = body["workers"]
    assert worker["url"] == d.url and worker["ready"] is True
    assert worker["models"]["active"] == v2 and worker["models"]["pinned"] is None
    assert isinstance(worker["predictions_per_s"], float)
    assert body["scored_by_version"][v2] >= 40
    assert body["quality_by_version"][v2]["n"] >= 20 and "rollout" not in body

    status, out = stratum("--url", d.url, "status", "--interval", "0")
    assert status == 0
    assert f"worker {d.url}: ready" in out and f"serving       {v2}" in out
    assert "predictions/s" not in out and "ACCURACY" in out and "LOG LOSS" in out

    status, out = stratum("models")
    assert status == 0
    assert out.splitlines()[0] == f"model default (classification): serving {v2}, not pinned"
    assert f"{v1}  -" in out and f"{v2}  serving" in out
    status, out = stratum("models", "--json")
    assert json.loads(out)["announced"] == [v1, v2]

    done = cli_process(d, "status", "--interval", "0")
    assert done.returncode == 0 and f"serving       {v2}" in done.stdout, done.stderr


def test_pin_unpin_rollback(in_deployment: Deployment, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    d = in_deployment
    v1, v2 = d.versions
    assert stratum("models", "rollback") == (1, "")
    assert "needs the admin token: set ADMIN_TOKEN or pass --token" in capsys.readouterr().err
    assert stratum("models", "pin", v1, "--token", "wrong-token") == (1, "")
    assert capsys.readouterr().err == ("stratum: error: HTTP 401: missing or wrong bearer "
                                       "token\n")
    assert stratum("models", "pin", "20200101T000000Z-000000", "--token", TOKEN)[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("stratum: error: HTTP 404: version '20200101T000000Z-000000' was "
                          "never announced") and err.count("\n") == 1

    status, out = stratum("models", "rollback", "--token", TOKEN, "--json")
    assert status == 0
    body = json.loads(out)
    assert body["pinned"] == v1 and body["active"] == v1
    assert http("GET", f"{d.url}/ready")[1] == {"model_version": v1}

    monkeypatch.setenv("ADMIN_TOKEN", TOKEN)
    status, out = stratum("models", "unpin")
    assert status == 0 and f"serving {v2}, not pinned" in out
    status, out = stratum("models", "pin", v1)
    assert status == 0 and out.splitlines()[0].endswith(f"serving {v1}, pinned {v1}")

    done = cli_process(d, "models", "unpin", ADMIN_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    assert http("GET", f"{d.url}/models/")[1]["pinned"] is None
    done = cli_process(d, "models", "pin", v1, ADMIN_TOKEN="")  # no token anywhere
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("stratum: error: 'models pin' needs the admin token: set "
                           "ADMIN_TOKEN or pass --token\n")
    assert http("GET", f"{d.url}/models/")[1]["active"] == v2


def without_ts(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in p.items() if k != "ts"} for p in predictions]


def test_predict_from_a_file_equals_post_predict(in_deployment: Deployment, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    d = in_deployment
    inputs = events(1500, "file")
    expected = []
    for start in (0, 1024):
        status, body, _ = http("POST", f"{d.url}/predict", inputs[start:start + 1024])
        assert status == 200
        expected.extend(body)

    as_list = tmp_path / "inputs.json"
    as_list.write_text(json.dumps(inputs))
    as_lines = tmp_path / "inputs.jsonl"
    as_lines.write_text("".join(json.dumps(e) + "\n" for e in inputs))
    for path in (as_list, as_lines):
        status, out = stratum("predict", "--file", str(path), "--json")
        assert status == 0
        assert without_ts([json.loads(line) for line in out.splitlines()]) == without_ts(expected)

    one = tmp_path / "one.json"
    one.write_text(json.dumps(inputs[3]))
    status, out = stratum("predict", "-f", str(one))
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "PREDICTED", "P", "VERSION"]
    assert row.split() == ["file-3", expected[3]["predicted"],
                           f"{max(expected[3]['probabilities']):.4f}", d.versions[1]]

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(e) + "\n" for e in inputs[:1100])
                   + json.dumps({"id": "x", "features": [1]}) + "\n")
    assert stratum("predict", "--file", str(bad)) == (1, "")
    err = capsys.readouterr().err
    assert err.startswith("stratum: error: HTTP 400: invalid input: #1100: ") and \
        err.count("\n") == 1

    done = cli_process(d, "predict", "--json", stdin=json.dumps(inputs[:5]))
    assert done.returncode == 0, done.stderr
    assert without_ts([json.loads(x) for x in done.stdout.splitlines()]) == \
        without_ts(expected[:5])


def test_tail_reads_predictions_and_dead_letters(in_deployment: Deployment,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    d = in_deployment
    s = d.settings
    malformed = [b"not json", b'{"id": "d-1"}', b'{"id": "d-2", "features": [1, 2]}']
    run(produce(s.bootstrap_servers, s.events_topic,
                [json.dumps(e).encode() for e in events(30, "tail")] + malformed))
    predictions = run(consume_until(s.bootstrap_servers, s.predictions_topic,
                                    lambda vs: sum(v["id"].startswith("tail-")
                                                   for v in vs) >= 30))
    dead = run(consume_until(s.bootstrap_servers, s.dlq_topic, lambda vs: len(vs) >= 3))

    status, out = stratum("tail", "predictions", "--from-beginning", "-n",
                          str(len(predictions)), "--json", "--timeout", "60")
    assert status == 0
    read = [json.loads(line) for line in out.splitlines()]
    assert sorted(map(json.dumps, read)) == sorted(map(json.dumps, predictions))

    status, out = stratum("tail", "dlq", "--from-beginning", "-n", "3", "--timeout", "60")
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 3 == len(dead)
    for message in dead:
        where = (f"{s.events_topic}[{message['source']['partition']}]"
                 f"@{message['source']['offset']}")
        assert any(line.startswith(where) and f"error={message['error']}" in line
                   for line in lines)

    status, out = stratum("tail", "predictions", "--from-beginning", "-n", "2")
    assert status == 0 and len(out.splitlines()) == 2 and "predicted=" in out

    # A topic that does not exist is an error, and reading it does not create it.
    missing = f"{s.predictions_topic}-missing"
    monkeypatch.setenv("PREDICTIONS_TOPIC", missing)
    assert stratum("tail", "predictions", "-n", "1") == (1, "")
    assert capsys.readouterr().err == (f"stratum: error: cannot read topic {missing!r} from "
                                       f"{s.bootstrap_servers}: no such topic\n")
    assert stratum("tail", "predictions", "-n", "1")[0] == 1
    capsys.readouterr()

    # Without --from-beginning only new messages: keep producing until the tail has 3.
    tail = subprocess.Popen([sys.executable, "-m", "stratum_cli", "tail", "predictions",
                             "-n", "3", "--timeout", "90"],
                            env={**os.environ, **d.env, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    sent = 0
    while tail.poll() is None and time.monotonic() < deadline:
        run(produce(s.bootstrap_servers, s.events_topic,
                    [json.dumps(events(1, f"new{sent}")[0]).encode()]))
        sent += 1
        time.sleep(0.5)
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    ids = [line.split()[2] for line in out.splitlines()]
    assert len(ids) == 3 and all(i.startswith("new") for i in ids), out


def test_promote_and_abort_end_a_rollout(in_deployment: Deployment,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d = in_deployment
    assert stratum("models", "promote", "--token", TOKEN) == (1, "")
    assert capsys.readouterr().err == "stratum: error: HTTP 409: no rollout in progress\n"

    registry = Registry(d.settings.registry_uri, d.settings.storage_options)
    serving = http("GET", f"{d.url}/models/")[1]["active"]
    candidates = [publish_small_model(registry, d.settings.model_name, FEATURES, CLASSES,
                                      seed=seed) for seed in (7, 8)]
    for ref, how in zip(candidates, ("abort", "promote")):
        run(announce(d.settings.bootstrap_servers, d.settings.updates_topic,
                     {**ref.to_message(), "rollout": {"mode": "canary", "share": 0.5}}))
        poll(lambda: http("GET", f"{d.url}/models/")[1]["rollout"],
             lambda r, v=ref.version: bool(r and r["candidate"] == v and r["loaded"]))
        status, out = stratum("models", how, "--token", TOKEN, "--version",
                              ref.version, "--reason", f"{how} from the command line", "--json")
        assert status == 0, capsys.readouterr().err
        body = json.loads(out)
        if how == "abort":
            assert body["active"] == serving and ref.version not in body["active"]
        else:
            assert body["active"] == ref.version
    assert http("GET", f"{d.url}/ready")[1] == {"model_version": candidates[1].version}
    decisions = [m for m in run(consume_until(d.settings.bootstrap_servers,
                                              d.settings.updates_topic, lambda vs: True))
                 if m.get("type") in ("PROMOTE", "ABORT")]
    assert [(m["type"], m["version"], m["by"], m["reason"]) for m in decisions[-2:]] == [
        ("ABORT", candidates[0].version, "operator", "abort from the command line"),
        ("PROMOTE", candidates[1].version, "operator", "promote from the command line")]

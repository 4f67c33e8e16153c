"""``make run``: Stratum on one machine, in the foreground, until Ctrl-C.

1. Starts the embedded stack (Kafka + ZooKeeper, s3rver) on the default ports of docs/contract.md, unless
   ``KAFKA_BROKER`` / ``S3_ENDPOINT_URL`` name existing ones.
2. Bootstraps a base model when the registry has none (``python -m demo bootstrap``: demo
   data into the lake when it is empty, then one batch run).
3. Runs the worker (``faust -A app worker``) and, unless ``DEMO_FEED=0``, the demo feed.

Ctrl-C (or SIGTERM) stops everything it started, children first, then the stack.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from app.settings import Settings, SettingsError
from devstack.stack import S3_CREDENTIALS, LocalStack, StackError, die_with_parent_preexec

__all__ = ["main"]

BIN = Path(sys.executable).parent


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _say(message: str) -> None:
    print(f"stratum: {message}", flush=True)


def _buckets(settings: Settings) -> list[str]:
    return sorted({urlparse(uri).netloc for uri in (settings.lake_uri, settings.registry_uri)
                   if uri.startswith("s3://")})


def _port(url: str, default: int) -> int:
    return urlparse(url if "//" in url else f"//{url}").port or default


def _spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A process group of its own: Ctrl-C reaches only this launcher, which then stops
    # the children in order (feed, worker, stack) instead of all at once.
    return subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=die_with_parent_preexec())


def _terminate(proc: subprocess.Popen[bytes], name: str, timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _say(f"{name} did not stop in {timeout:.0f}s; killing it")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_ready(url: str, worker: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def main() -> int:
    """Run the local deployment in the foreground; the exit status of what failed, or 0."""
    began = time.monotonic()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"stratum: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    env = dict(os.environ)
    own_kafka = "KAFKA_BROKER" not in os.environ
    own_s3 = "S3_ENDPOINT_URL" not in os.environ
    stack: LocalStack | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    status = 0
    try:
        if own_kafka or own_s3:
            servers = settings.broker_servers()
            stack = LocalStack(
                kafka_port=_port(servers[0], 9092), zk_port=2181,
                s3_port=_port(settings.s3_endpoint_url or "", 9000),
                with_kafka=own_kafka, with_s3=own_s3, s3_buckets=_buckets(settings))
            _say("starting the local stack (" + ", ".join(
                p for p, on in (("Kafka", own_kafka), ("S3", own_s3)) if on) + ")")
            stack.start()
            _say(f"stack ready: {stack.describe()}")
            if own_kafka:
                env["KAFKA_BROKER"] = stack.kafka_broker
            if own_s3:
                env["S3_ENDPOINT_URL"] = stack.s3_endpoint_url
                env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = S3_CREDENTIALS
        _say("checking the model registry (bootstraps a base model when it is empty)")
        bootstrap = _spawn([sys.executable, "-m", "demo", "bootstrap"], env)
        children.append(("bootstrap", bootstrap))
        if bootstrap.wait() != 0:
            _say(f"bootstrap failed with exit status {bootstrap.returncode}")
            return bootstrap.returncode or 1
        worker = _spawn([str(BIN / "faust"), "-A", "app", "worker", "-l", "info"], env)
        children.append(("worker", worker))
        web = f"http://{settings.web_bind}:{settings.web_port}"
        if not _wait_ready(f"{web}/ready", worker, timeout=120):
            _say("the worker did not become ready; see its log above")
            return worker.poll() or 1
        if env.get("DEMO_FEED", "1") != "0":
            children.append(("feed", _spawn([sys.executable, "-m", "demo.feed"], env)))
        _say(f"serving after {time.monotonic() - began:.0f}s; web view: {web}/ "
             "(Ctrl-C stops everything)")
        while True:
            for name, proc in children:
                if name != "bootstrap" and proc.poll() is not None:
                    _say(f"{name} exited with status {proc.returncode}; stopping")
                    return proc.returncode or 1
            time.sleep(0.5)
    except _Stop:
        _say("stopping")
    except StackError as exc:
        _say(f"the local stack could not start: {exc}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, proc in reversed(children):
            _terminate(proc, name)
        if stack is not None:
            stack.stop()
        _say("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())

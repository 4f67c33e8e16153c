"""A Spark standalone cluster on this machine: one master and N workers, for the batch job.

The pyspark wheel ships ``bin/spark-class`` but not ``sbin/start-master.sh``;
:class:`SparkStandalone` starts the daemons with ``spark-class`` itself::

    spark-class org.apache.spark.deploy.master.Master --host 127.0.0.1 --port P --webui-port W
    spark-class org.apache.spark.deploy.worker.Worker spark://127.0.0.1:P --host 127.0.0.1 \\
        --cores 1 --memory 1g --work-dir DIR --webui-port W2

on free loopback ports, each in a process group of its own (a worker's executors and their
Python workers are in its group, so stopping the group stops them too), and waits until the
master's ``/json/`` reports every worker ALIVE. The batch job then runs against
:attr:`SparkStandalone.master_url` (``SPARK_MASTER=spark://127.0.0.1:P``).

Executors inherit their worker's environment: the ``env`` given to the workers is how they get
S3 credentials (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``), which the batch job never
ships inside its tasks, and ``GLOO_SOCKET_IFNAME`` where distributed training must use a
particular network interface.

This module needs only the standard library and the installed pyspark package. Command line::

    python -m devstack.spark_cluster up [--workers 2] [--cores 1] [--memory 1g] [--port 7077]
                                   [--work-dir .stack/spark] [--env NAME=VALUE ...]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence

from devstack.stack import DEFAULT_CACHE_DIR, die_with_parent_preexec, free_ports, run_in_foreground

__all__ = ["SparkStandalone", "SparkClusterError", "spark_home", "main"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Java 17, as on every target machine; an explicit ``JAVA_HOME`` wins.
_JAVA_HOME = "/usr/lib/jvm/java-1.17.0-openjdk-amd64"
_MASTER_CLASS = "org.apache.spark.deploy.master.Master"
_WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
#: Heap of the master and worker daemons: they only schedule (executors get their own JVMs).
_DAEMON_MEMORY = "256m"


class SparkClusterError(RuntimeError):
    """The cluster could not be started, or a daemon of it died."""


def spark_home() -> Path:
    """The installed pyspark package's directory, which holds ``bin/spark-class`` and the jars.

    Found without importing pyspark (its import costs about a second).
    """
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise SparkClusterError("pyspark is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class _Daemon:
    """One master or worker process and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the daemon's whole process group (its executors included)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_bytes()[-100_000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


class SparkStandalone:
    """A Spark standalone master and ``workers`` workers on loopback ports, as a context manager.

    Parameters
    ----------
    work_dir : str or Path
        Holds ``logs/`` (one log per daemon) and each worker's work directory
        (``worker-N/``, where executors keep their ``stdout`` and ``stderr``).
    workers : int
        Number of workers.
    cores_per_worker : int
        Cores each worker offers; a worker runs one executor per application, with its cores.
    memory_per_worker : str
        Memory each worker offers executors (``512m``, ``1g``...). It must hold the
        application's ``spark.executor.memory`` (Spark's default: ``1g``), else no executor
        is ever granted.
    env : mapping, optional
        Extra environment of the worker processes, which their executors inherit: S3
        credentials, ``PYSPARK_PYTHON`` (default: this interpreter), ``PYTHONPATH``,
        ``GLOO_SOCKET_IFNAME``...
    host : str
        Address every daemon binds and advertises.
    port : int, optional
        Master port (default: a free one).
    start_timeout : float
        Seconds to wait for the master and every worker.

    Examples
    --------
    >>> with SparkStandalone("/tmp/spark", workers=2) as cluster:  # doctest: +SKIP
    ...     run_batch_job(SPARK_MASTER=cluster.master_url)
    """

    def __init__(self, work_dir: str | Path, workers: int = 2, cores_per_worker: int = 1,
                 memory_per_worker: str = "1g", env: Mapping[str, str] | None = None, *,
                 host: str = "127.0.0.1", port: int | None = None,
                 start_timeout: float = 180.0) -> None:
        if workers < 1 or cores_per_worker < 1:
            raise ValueError("a cluster needs at least one worker with at least one core")
        self.work_dir = Path(work_dir).resolve()
        self.workers = workers
        self.cores_per_worker = cores_per_worker
        self.memory_per_worker = memory_per_worker
        self.env = dict(env or {})
        self.host = host
        self.port = port
        self.webui_port: int | None = None
        self.start_timeout = start_timeout
        self._daemons: list[_Daemon] = []

    # -- public -------------------------------------------------------------------------------

    @property
    def master_url(self) -> str:
        """``spark://HOST:PORT``: the ``SPARK_MASTER`` of applications on this cluster."""
        if self.port is None:
            raise SparkClusterError("the cluster has not been started")
        return f"spark://{self.host}:{self.port}"

    @property
    def webui_url(self) -> str:
        """The master's web UI (``/json/`` is its state as JSON)."""
        if self.webui_port is None:
            raise SparkClusterError("the cluster has not been started")
        return f"http://{self.host}:{self.webui_port}"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def running(self) -> bool:
        """True while every daemon is alive."""
        return bool(self._daemons) and all(d.alive for d in self._daemons)

    def worker_dirs(self) -> list[Path]:
        """Each worker's work directory (``<app id>/<executor id>/stdout|stderr`` inside)."""
        return [self.work_dir / f"worker-{i}" for i in range(1, self.workers + 1)]

    def state(self, timeout: float = 5.0) -> dict[str, Any]:
        """The master's state (``/json/``): workers, active and completed applications."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))

    def start(self) -> None:
        """Start the master, then the workers, and wait until all workers are ALIVE.

        Raises
        ------
        SparkClusterError
            A daemon exited or the workers did not register within ``start_timeout``;
            whatever was started is stopped again.
        """
        if self._daemons:
            raise SparkClusterError("the cluster is already running")
        script = spark_home() / "bin" / "spark-class"
        if not script.is_file():
            raise SparkClusterError(f"{script} is missing: is pyspark installed completely?")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 + self.workers, self.host)
        if self.port is None:
            self.port = ports[0]
        self.webui_port = ports[1]
        deadline = time.monotonic() + self.start_timeout
        try:
            self._spawn("master", [str(script), _MASTER_CLASS, "--host", self.host,
                                   "--port", str(self.port),
                                   "--webui-port", str(self.webui_port)], {})
            for i, webui_port in enumerate(ports[2:], start=1):
                work = self.work_dir / f"worker-{i}"
                work.mkdir(parents=True, exist_ok=True)
                self._spawn(f"worker-{i}", [
                    str(script), _WORKER_CLASS, self.master_url, "--host", self.host,
                    "--cores", str(self.cores_per_worker), "--memory", self.memory_per_worker,
                    "--work-dir", str(work), "--webui-port", str(webui_port)],
                    self._worker_env())
            self._await_workers(deadline)
        except BaseException:
            self.stop()
            raise
        log.info("spark cluster ready: %s (%d workers x %d cores, %s each)", self.master_url,
                 self.workers, self.cores_per_worker, self.memory_per_worker)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the workers (and their executors), then the master: SIGTERM to each process
        group, SIGKILL after ``timeout`` seconds."""
        daemons, self._daemons = self._daemons, []
        # Workers first, so that no worker spends its shutdown reconnecting to a dead master.
        for group in ([d for d in daemons if d.name != "master"],
                      [d for d in daemons if d.name == "master"]):
            for daemon in group:
                daemon.signal(signal.SIGTERM)
            end = time.monotonic() + timeout
            for daemon in group:
                try:
                    daemon.process.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0fs; killing it", daemon.name,
                                timeout)
                    daemon.signal(signal.SIGKILL)
                    daemon.process.wait()
                # Executors and Python workers may outlive the daemon: none may survive.
                daemon.signal(signal.SIGKILL)

    def describe(self) -> str:
        return (f"{self.master_url} (web UI {self.webui_url}; {self.workers} workers x "
                f"{self.cores_per_worker} cores, {self.memory_per_worker}; logs in "
                f"{self.log_dir})")

    def __enter__(self) -> "SparkStandalone":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        if "JAVA_HOME" not in env and Path(_JAVA_HOME).is_dir():
            env["JAVA_HOME"] = _JAVA_HOME
        # This package's Spark, whatever SPARK_HOME the caller's shell has.
        env["SPARK_HOME"] = str(spark_home())
        # Executors bind and advertise this address too (they read it from their environment).
        env["SPARK_LOCAL_IP"] = self.host
        env.setdefault("SPARK_DAEMON_MEMORY", _DAEMON_MEMORY)
        return env

    def _worker_env(self) -> dict[str, str]:
        env = {"PYSPARK_PYTHON": sys.executable}
        env.update(self.env)
        return env

    def _spawn(self, name: str, cmd: list[str], extra_env: Mapping[str, str]) -> None:
        log_path = self.log_dir / f"{name}.log"
        env = self._base_env()
        env.update(extra_env)
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=self.work_dir,
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=die_with_parent_preexec())
        self._daemons.append(_Daemon(name, process, log_path))
        log.debug("started %s (pid %d): %s", name, process.pid, " ".join(cmd))

    def _await_workers(self, deadline: float) -> None:
        alive = 0
        while True:
            for daemon in self._daemons:
                if not daemon.alive:
                    raise SparkClusterError(
                        f"spark {daemon.name} exited with status {daemon.process.returncode}; "
                        f"the end of {daemon.log_path}:\n{daemon.log_tail()}")
            try:
                state = self.state(timeout=2.0)
            except (OSError, ValueError):  # the master's web UI is not up yet
                state = {}
            alive = sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")
            if state.get("status") == "ALIVE" and alive >= self.workers:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {d.name}:\n{d.log_tail(10)}" for d in self._daemons)
                raise SparkClusterError(
                    f"{alive} of {self.workers} spark workers registered with {self.master_url} "
                    f"within {self.start_timeout:.0f}s\n{tails}")
            time.sleep(0.25)  # polling interval of the master's state, not a wait for an event


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"spark cluster: --env expects NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _cmd_up(args: argparse.Namespace) -> int:
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # Executors unpickle the job's functions by module name: a source checkout must be
    # importable without being installed.
    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT)] + [p for p in paths
                                                              if p != str(REPO_ROOT)])}
    env.update(_parse_env(args.env))
    cluster = SparkStandalone(args.work_dir, workers=args.workers, cores_per_worker=args.cores,
                              memory_per_worker=args.memory, env=env, host=args.host,
                              port=args.port, start_timeout=args.timeout)
    try:
        return run_in_foreground(
            "spark cluster", cluster.start, lambda: cluster.running, cluster.stop,
            # The master URL alone on stdout, for scripts; the rest on stderr.
            ready_line=lambda: cluster.master_url, exit_line=lambda: "a daemon exited",
            ready_note=lambda: f"spark cluster ready: {cluster.describe()}; Ctrl-C stops it")
    except SparkClusterError as exc:
        print(f"spark cluster: {exc}", file=sys.stderr, flush=True)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devstack.spark_cluster``."""
    parser = argparse.ArgumentParser(prog="python -m devstack.spark_cluster",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run a master and workers in the foreground until Ctrl-C; "
                                   "prints the master URL")
    up.add_argument("--workers", type=int, default=2, help="workers (default: %(default)s)")
    up.add_argument("--cores", type=int, default=1,
                    help="cores per worker (default: %(default)s)")
    up.add_argument("--memory", default="1g",
                    help="executor memory per worker, at least spark.executor.memory "
                         "(default: %(default)s)")
    up.add_argument("--host", default="127.0.0.1",
                    help="address the daemons bind and advertise (default: %(default)s)")
    up.add_argument("--port", type=int, default=None, help="master port (default: a free one)")
    up.add_argument("--work-dir", type=Path, default=DEFAULT_CACHE_DIR / "spark",
                    help="logs and executor work directories (default: %(default)s)")
    up.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment of the workers and their executors, on top of this "
                         "command's own (e.g. AWS_ACCESS_KEY_ID=..., GLOO_SOCKET_IFNAME=eth0)")
    up.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait for the workers (default: %(default)s)")
    up.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _cmd_up(args)


if __name__ == "__main__":
    sys.exit(main())

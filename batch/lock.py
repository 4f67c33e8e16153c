"""One batch run per model at a time, across machines: a lock object in the registry.

The lock is ``REGISTRY_URI/_locks/<model>.json`` (``_locks`` cannot be a model name), holding
the owner (host and process), a random token and an expiry. A run takes it before reading the
lake and gives it back at the end; while the run goes on, a heartbeat thread pushes the expiry
forward, so a crashed run's lock expires after ``ttl_s`` and the next run may take it over.

Taking the lock writes it with S3's conditional ``If-None-Match: *`` where the store supports
it (AWS S3 does) and, because some S3-API servers ignore that header, reads it back after a
short settle time: of two runs that raced, only the one whose token is in the object goes on.
The settle time need not be spent idle: :meth:`RegistryLock.acquire` with ``confirm=False``
writes the lock and returns, the run does harmless work (listing the lake, starting Spark), and
:meth:`RegistryLock.confirm` waits out what is left of the settle time, reads the lock back
before the run reads any data and renews it at once (the work in between may have used much of
``ttl_s``; a lock confirmed only after ``ttl_s`` is refused). Every machine that can reach the registry honours the lock,
which a local file lock could not give.

Losing the lock. A run whose heartbeat stalled past ``ttl_s`` (a frozen process, a store
unreachable for that long) may find its lock taken over by the next run. The lock is then
*lost* (:attr:`RegistryLock.lost` is set) when

* a heartbeat reads the object and finds another token, or its own last successful renewal is
  ``ttl_s`` old (the lock may have expired: it is never renewed again), or its renewal write is
  refused or read back with another token;
* :meth:`RegistryLock.check`, which the job calls immediately before writing a version's
  manifest, before announcing it and before pruning, finds any of that.

A lost lock stops the run with :class:`~batch.errors.LockLostError` before it publishes,
announces or prunes anything further. A renewal writes only over the object it has just read
back as its own: ``If-Match`` with that object's ETag, so on AWS S3 a successor's write in
between makes the renewal fail instead of overwriting it.

What remains. The embedded S3 server (s3rver) ignores ``If-Match`` and ``If-None-Match`` on
PutObject, and local disk has no conditional write at all; there a renewal that read the
object as its own can still land just after a successor's takeover and overwrite it. The
renewal reads the object back after writing, and each run checks before each publication
step, so the two runs find out and one stops; but a step already past its check (a manifest
being written, an announcement being sent) completes. The window is one store round trip, and
opens only for a run that stalled about ``ttl_s`` (default an hour) without noticing it. Even
with conditional writes, checks and writes are separate requests: a run frozen between its
check and its write for longer than ``ttl_s`` writes after a successor took over. Only the
store fencing every registry write with the lock's token would close that. Expiry is judged
with each machine's clock: keep clocks within a small fraction of ``ttl_s``.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from batch.errors import LockError, LockLostError, StorageError
from models.storage import ensure_bucket, filesystem

__all__ = ["RegistryLock", "lock_uri"]

log = logging.getLogger(__name__)

_SETTLE_S = 1.0


def lock_uri(registry_uri: str, model: str) -> str:
    """Where the lock of ``model`` lives."""
    return f"{registry_uri.rstrip('/')}/_locks/{model}.json"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RegistryLock:
    """The run lock of one model; use as a context manager.

    Parameters
    ----------
    registry_uri : str
        Registry root.
    storage_options : mapping, optional
        fsspec options.
    model : str
        Model name.
    ttl_s : float
        Seconds after the last heartbeat at which the lock counts as abandoned.
    settle_s : float
        Wait between writing the lock and reading it back.
    clock : callable
        Seconds since the epoch (injectable for tests).
    """

    def __init__(self, registry_uri: str, storage_options: Mapping[str, Any] | None,
                 model: str, ttl_s: float = 3600.0, settle_s: float = _SETTLE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.uri = lock_uri(registry_uri, model)
        self.model = model
        self.ttl_s = float(ttl_s)
        self.settle_s = settle_s
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.token = secrets.token_hex(16)
        self._fs, self._path = filesystem(self.uri, storage_options)
        self._held = False
        self._written_at: float | None = None
        self._etag: str | None = None
        # Monotonic time of the newest write of this run's lock known to have landed as its
        # own: the lock is valid until ttl_s after it, by this machine's clock.
        self._renewed_at: float | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: Set once the lock is known lost (taken over, or possibly expired); never cleared.
        self.lost = threading.Event()
        self._lost_reason = ""
        self._renewing = threading.Lock()  # one renewal or check at a time

    def __repr__(self) -> str:
        return f"RegistryLock({self.uri!r}, owner={self.owner!r})"

    # ------------------------------------------------------------------------------ reading
    def holder(self) -> dict[str, Any] | None:
        """The lock object's content, or None when nobody holds the lock."""
        try:
            raw = self._fs.cat_file(self._path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StorageError(f"cannot read the run lock {self.uri}: "
                               f"{type(exc).__name__}: {exc}") from exc
        try:
            data = json.loads(raw)
            return data if isinstance(data, dict) else {}
        except ValueError:
            return {}  # unreadable: treated as held by an unknown owner until it expires

    def _body(self) -> bytes:
        now = self.clock()
        return json.dumps({"owner": self.owner, "token": self.token, "model": self.model,
                           "acquired_at": _iso(now), "expires_at": _iso(now + self.ttl_s),
                           "expires_epoch": now + self.ttl_s}).encode()

    # ------------------------------------------------------------------------------ taking
    def acquire(self, confirm: bool = True) -> None:
        """Take the lock or raise :class:`LockError` naming the run that holds it.

        With ``confirm=False`` the lock is written but not yet read back: the caller must call
        :meth:`confirm` before doing anything another run must not do at the same time.
        """
        current = self.holder()
        if current is not None:
            expires = current.get("expires_epoch")
            if isinstance(expires, (int, float)) and expires > self.clock():
                raise LockError(f"another batch run of {self.model!r} is in progress "
                                f"({current.get('owner', 'unknown owner')}, lock held until "
                                f"{current.get('expires_at')}); not starting")
            if not isinstance(expires, (int, float)):
                raise LockError(f"the run lock {self.uri} is unreadable; remove it if no run "
                                "is in progress")
            log.warning("taking over the expired run lock of %s (was %s)",
                        self.model, current.get("owner"))
        try:
            ensure_bucket(self._fs, self._path)
            # Local stores need the directory; on S3 this is a no-op.
            self._fs.makedirs(self._path.rsplit("/", 1)[0], exist_ok=True)
            if current is None:
                try:
                    self._fs.pipe_file(self._path, self._body(), mode="create")
                except FileExistsError:
                    raise LockError(f"another batch run of {self.model!r} took the lock "
                                    "first; not starting") from None
            else:
                self._fs.pipe_file(self._path, self._body())
        except LockError:
            raise
        except Exception as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                raise LockError(f"another batch run of {self.model!r} took the lock first; "
                                "not starting") from None
            raise StorageError(f"cannot write the run lock {self.uri}: "
                               f"{type(exc).__name__}: {exc}") from exc
        self._written_at = time.monotonic()
        if confirm:
            self.confirm()

    def confirm(self) -> None:
        """Wait out the rest of the settle time, then make sure the lock is still this run's.

        Stores that ignore If-None-Match let the last writer win; the loser notices here and
        :class:`LockError` is raised.
        """
        if self._held:
            return
        if self._written_at is None:
            raise RuntimeError("confirm() before acquire()")
        left = self.settle_s - (time.monotonic() - self._written_at)
        if left > 0:
            self._stop.wait(left)
        after = self.holder()
        if not after or after.get("token") != self.token:
            raise LockError(f"another batch run of {self.model!r} "
                            f"({(after or {}).get('owner', 'unknown')}) took the lock at the "
                            "same time; not starting")
        if time.monotonic() - self._written_at >= self.ttl_s:
            raise LockError(f"the run lock of {self.model!r} expired before this run confirmed "
                            f"it ({self.ttl_s:g}s after writing it); not starting")
        self._held = True
        self._renewed_at = self._written_at
        # The work between writing and confirming (starting Spark) may have used much of the
        # TTL: renew now, then every ttl_s / 3.
        try:
            self.renew()
        except StorageError as exc:
            log.warning("could not renew the run lock %s: %s", self.uri, exc)
        self.raise_if_lost()
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_loop, name="registry-lock",
                                           daemon=True)
        self._heartbeat.start()
        log.info("took the run lock %s", self.uri)

    def _renew_loop(self) -> None:
        while not self.lost.is_set() and not self._stop.wait(max(1.0, self.ttl_s / 3)):
            try:
                self.renew()
            except StorageError as exc:  # the store may be down for a moment; the TTL covers it
                log.warning("could not renew the run lock %s: %s", self.uri, exc)

    # ------------------------------------------------------------------------------ keeping
    def renew(self) -> None:
        """One heartbeat: push the expiry forward if the lock is still this run's.

        Marks the lock :attr:`lost` (and writes nothing) when the object holds another token or
        this run's last renewal is ``ttl_s`` old; the write is conditional on the object read
        (``If-Match`` its ETag, on S3) and read back afterwards.

        Raises
        ------
        StorageError
            The store could not be read or written; the lock is not lost for that alone.
        """
        with self._renewing:
            if not self._still_mine():
                return
            started = time.monotonic()
            try:
                self._write_renewal()
            except LockError as exc:
                self._lose(str(exc))
                return
            except Exception as exc:
                raise StorageError(f"cannot write the run lock {self.uri}: "
                                   f"{_describe(exc)}") from exc
            if self._still_mine(after_write=True):
                self._renewed_at = started

    def check(self) -> None:
        """Make sure the lock is still this run's now, reading it from the store.

        Raises
        ------
        LockLostError
            It was taken over, or it may have expired (see the module notes).
        StorageError
            The store could not be read: nothing may be published without knowing.
        """
        self.raise_if_lost()
        with self._renewing:
            self._still_mine()
        self.raise_if_lost()

    def raise_if_lost(self) -> None:
        """Raise :class:`LockLostError` if the lock is already known lost (no store access)."""
        if self.lost.is_set():
            raise LockLostError(f"lost the run lock of {self.model!r}: {self._lost_reason}; "
                                "stopping before publishing anything")

    def _still_mine(self, after_write: bool = False) -> bool:
        """Whether the lock object holds this run's token and the lock cannot have expired;
        marks it lost otherwise. Call with ``_renewing`` held."""
        if self.lost.is_set():
            return False
        if self._renewed_at is not None and time.monotonic() - self._renewed_at >= self.ttl_s:
            self._lose(f"not renewed for {self.ttl_s:g}s, so it may have expired and been "
                       "taken over")
            return False
        self._etag, current = self._read_versioned()
        if not current or current.get("token") != self.token:
            what = "after renewing it" if after_write else "while the run went on"
            self._lose(f"the lock object names {(current or {}).get('owner', 'nobody')} "
                       f"{what}")
            return False
        return True

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self._lost_reason = reason
            self.lost.set()
            log.error("lost the run lock %s: %s", self.uri, reason)

    def _is_s3(self) -> bool:
        protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        return protocol in ("s3", "s3a")

    def _read_versioned(self) -> tuple[str | None, dict[str, Any] | None]:
        """The lock object's ETag (on S3) and content. The ETag is read first: when the content
        then read is this run's, the ETag is that object's (nobody else writes this token)."""
        etag = None
        if self._is_s3():
            bucket, key, _ = self._fs.split_path(self._path)
            try:
                etag = self._fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
            except FileNotFoundError:
                return None, None
            except Exception as exc:
                raise StorageError(f"cannot read the run lock {self.uri}: "
                                   f"{_describe(exc)}") from exc
        return etag, self.holder()

    def _write_renewal(self) -> None:
        """Write a fresh expiry, on S3 only over the object last read (``If-Match``)."""
        if not self._is_s3() or self._etag is None:
            self._fs.pipe_file(self._path, self._body())
            return
        bucket, key, _ = self._fs.split_path(self._path)
        try:
            self._fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(),
                             IfMatch=self._etag, ContentType="application/json")
        except Exception as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                raise LockError("another run wrote the lock object since it was read") from None
            raise

    def release(self) -> None:
        """Give the lock back (only if this run still holds it)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        if not self._held:
            return
        self._held = False
        try:
            current = self.holder()
            if current and current.get("token") == self.token:
                self._fs.rm_file(self._path)
                log.info("released the run lock %s", self.uri)
        except Exception as exc:  # an unreachable store: the lock expires on its own
            log.warning("could not release the run lock %s (%s); it expires at its TTL",
                        self.uri, _describe(exc))

    def __enter__(self) -> "RegistryLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

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
:meth:`RegistryLock.confirm` waits out what is left of the settle time and reads the lock back
before the run reads any data. Every machine that can reach the registry honours the lock,
which a local file lock could not give.
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

from batch.errors import LockError, StorageError
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
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

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
        self._held = True
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_loop, name="registry-lock",
                                           daemon=True)
        self._heartbeat.start()
        log.info("took the run lock %s", self.uri)

    def _renew_loop(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl_s / 3)):
            try:
                current = self.holder()
                if not current or current.get("token") != self.token:
                    log.error("lost the run lock %s to %s", self.uri,
                              (current or {}).get("owner"))
                    return
                self._fs.pipe_file(self._path, self._body())
            except Exception as exc:  # the store may be down for a moment; the TTL covers it
                log.warning("could not renew the run lock %s: %s", self.uri, _describe(exc))

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

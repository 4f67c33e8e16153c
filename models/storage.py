"""Opening the lake and the registry through fsspec, the same way for S3 and local paths."""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Mapping

import fsspec
from fsspec import AbstractFileSystem

__all__ = ["filesystem", "ensure_bucket", "sha256_hex", "LOCAL_PROTOCOLS"]

log = logging.getLogger(__name__)

#: Protocols for which S3 storage options mean nothing and are dropped.
LOCAL_PROTOCOLS = ("file", "local", "memory")


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None
               ) -> tuple[AbstractFileSystem, str]:
    """Open the filesystem of ``uri`` and return it with the protocol-less path.

    Parameters
    ----------
    uri : str
        ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path.
    storage_options : mapping, optional
        Keyword arguments for the filesystem (``key``, ``secret``, ``client_kwargs`` for s3fs).
        Ignored for local paths, so one set of settings serves both.

    Returns
    -------
    tuple
        ``(fs, path)``.

    Notes
    -----
    Each call gets its own filesystem instance without a listings cache: a registry or lake is
    written by other processes, and a cached listing would hide their new files.
    """
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    if protocol in LOCAL_PROTOCOLS:
        options: dict[str, Any] = {}
    else:
        options = dict(storage_options or {})
        options.setdefault("use_listings_cache", False)
    options["skip_instance_cache"] = True
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/") or "/"


def ensure_bucket(fs: AbstractFileSystem, path: str) -> None:
    """Create the bucket holding ``path`` on an object store if it does not exist yet.

    A fresh embedded S3 server has no buckets; the first writer creates the one it needs.
    """
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("s3", "s3a"):
        return
    bucket = path.split("/", 1)[0]
    if fs.exists(bucket):
        return
    try:
        fs.mkdir(bucket)
        log.info("created bucket %s", bucket)
    except FileExistsError:  # another process created it meanwhile
        pass
    except OSError as exc:
        # S3 answers BucketAlreadyOwnedByYou when a concurrent writer won the race.
        if "BucketAlready" not in str(exc):
            raise


def sha256_hex(data: bytes) -> str:
    """Lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()

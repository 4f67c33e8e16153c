"""Opening the lake and the registry through fsspec, the same way for S3 and local paths."""
from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, Mapping

import fsspec
from fsspec import AbstractFileSystem

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["filesystem", "ensure_bucket", "sha256_hex", "LOCAL_PROTOCOLS", "CREDENTIAL_OPTIONS",
           "task_storage_options", "share_local_credentials", "is_local_master"]

log = logging.getLogger(__name__)

#: Protocols for which S3 storage options mean nothing and are dropped.
LOCAL_PROTOCOLS = ("file", "local", "memory")
#: s3fs options that are credentials: never part of what a Spark task carries.
CREDENTIAL_OPTIONS = ("key", "secret", "token")
#: The same inside ``client_kwargs`` (botocore client arguments).
_CREDENTIAL_CLIENT_KWARGS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
#: The environment variables botocore's chain reads, by s3fs option.
_CREDENTIAL_ENV = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY",
                   "token": "AWS_SESSION_TOKEN"}


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


# -- what a Spark task may carry ---------------------------------------------------------------

def is_local_master(master: str) -> bool:
    """True for ``local``, ``local[N]``, ``local[*]``, ``local-cluster[...]``: executors are
    this machine's processes, started from the driver's JVM."""
    return master.strip().startswith("local")


def task_storage_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` without credentials: what a Spark task closure may carry.

    The endpoint and every other option stay; key, secret and session token (top level or in
    ``client_kwargs``) go, so an executor's filesystem uses botocore's credential chain, i.e.
    the executor's own environment, config files or instance role.
    """
    options = {k: v for k, v in (storage_options or {}).items() if k not in CREDENTIAL_OPTIONS}
    client_kwargs = options.get("client_kwargs")
    if isinstance(client_kwargs, Mapping):
        options["client_kwargs"] = {k: v for k, v in client_kwargs.items()
                                    if k not in _CREDENTIAL_CLIENT_KWARGS}
    return options


def share_local_credentials(spark: "SparkSession",
                            storage_options: Mapping[str, Any] | None) -> None:
    """On a local master, put the credentials of ``storage_options`` in the environment of the
    executors' Python workers; on any other master, do nothing.

    Local executors run inside the driver's JVM, started with the driver's environment, which
    lacks credentials given only through settings (``Settings.storage_options`` supplies the
    embedded server's fixed keys by itself). The variables go to the Python workers the JVM
    starts (``SparkContext.environment``), never into a task closure, and never leave this
    machine. Cluster executors must have credentials of their own.
    """
    sc = spark.sparkContext
    if not is_local_master(str(sc.master)):
        return
    for option, variable in _CREDENTIAL_ENV.items():
        value = (storage_options or {}).get(option)
        if value is not None:
            sc.environment[variable] = str(value)

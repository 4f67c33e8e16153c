"""The job's SparkSession: local by default, quiet, Arrow on, and able to import Stratum.

Also what the job's Spark tasks may carry: :func:`task_storage_options` strips S3 credentials
from the storage options a task closure holds, and :func:`share_local_credentials` gives them to
the executors of a local master through their environment instead. On a cluster, executors take
credentials from their own environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` of the
worker that launched them, AWS config files, an instance role: botocore's standard chain).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from models.storage import (CREDENTIAL_OPTIONS, is_local_master, share_local_credentials,
                            task_storage_options)

if TYPE_CHECKING:  # pyspark is heavy: import it only when a session is really wanted
    from pyspark.sql import SparkSession

__all__ = ["get_session", "spark_error_reason", "DEFAULT_MASTER", "driver_addresses",
           "is_loopback", "is_local_master", "task_storage_options", "share_local_credentials",
           "CREDENTIAL_OPTIONS"]

log = logging.getLogger(__name__)

#: Spark master when ``SPARK_MASTER`` is unset: two local cores, as on the target machines.
DEFAULT_MASTER = "local[2]"
_JAVA_HOME = "/usr/lib/jvm/java-1.17.0-openjdk-amd64"
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
_LOG4J_CONFIG = Path(__file__).resolve().with_name("log4j2.properties")



def _prepare_environment() -> None:
    """Environment the JVM and its Python workers need; explicit user settings win."""
    if "JAVA_HOME" not in os.environ and Path(_JAVA_HOME).is_dir():
        os.environ["JAVA_HOME"] = _JAVA_HOME
    # Without it Spark resolves the hostname, which on these machines can be unroutable.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    # Python workers must run the driver's interpreter (the venv with numpy, torch, s3fs).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Tasks unpickle functions of batch/ and models/ by module name; in local mode the
    # workers inherit this environment, so a source checkout works without installing it.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _PROJECT_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_PROJECT_ROOT] + [p for p in paths if p])


def driver_addresses(host: str | None = None, bind: str | None = None) -> tuple[str, str]:
    """The address executors reach the driver at, and the address the driver listens on.

    ``host``: the argument, else ``SPARK_DRIVER_HOST``, else ``SPARK_LOCAL_IP``, else
    127.0.0.1. ``bind``: the argument, else ``SPARK_DRIVER_BIND``, else ``host``.
    """
    host = (host or os.environ.get("SPARK_DRIVER_HOST") or os.environ.get("SPARK_LOCAL_IP")
            or "127.0.0.1")
    bind = bind or os.environ.get("SPARK_DRIVER_BIND") or host
    return host, bind


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def get_session(app_name: str = "stratum-batch", master: str | None = None,
                driver_memory: str | None = None, shuffle_partitions: int = 4,
                driver_host: str | None = None, driver_bind: str | None = None
                ) -> "SparkSession":
    """Get or create the SparkSession the batch job runs on.

    Parameters
    ----------
    app_name : str
        Spark application name.
    master : str, optional
        Spark master URL (default: ``SPARK_MASTER`` or ``local[2]``).
    driver_memory : str, optional
        Driver heap (default: ``SPARK_DRIVER_MEMORY`` or ``1g``); only applies to a new JVM.
    shuffle_partitions : int
        ``spark.sql.shuffle.partitions``: Spark's default of 200 is pure overhead for
        data that fits a laptop.
    driver_host : str, optional
        ``spark.driver.host``, the address executors reach the driver at (default:
        ``SPARK_DRIVER_HOST``, else ``SPARK_LOCAL_IP``, else 127.0.0.1). On a cluster whose
        executors run on other machines, this machine's address they can route to.
    driver_bind : str, optional
        ``spark.driver.bindAddress`` (default: ``SPARK_DRIVER_BIND``, else ``driver_host``);
        ``0.0.0.0`` behind NAT, where the advertised address is not a local one.

    Returns
    -------
    pyspark.sql.SparkSession
    """
    _prepare_environment()
    from pyspark.sql import SparkSession

    master = master or os.environ.get("SPARK_MASTER", DEFAULT_MASTER)
    driver_memory = driver_memory or os.environ.get("SPARK_DRIVER_MEMORY", "1g")
    driver_host, driver_bind = driver_addresses(driver_host, driver_bind)
    builder = (
        SparkSession.builder.appName(app_name)
        .master(master)
        .config("spark.driver.memory", driver_memory)
        # The job collects its preprocessed rows into the driver: let them fill the heap the
        # driver was given rather than stop at Spark's default of 1g (about 7M rows of 30
        # features).
        .config("spark.driver.maxResultSize", driver_memory)
        .config("spark.driver.bindAddress", driver_bind)
        .config("spark.driver.host", driver_host)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        # HotSpot does not JIT-compile a method over 8000 bytes of bytecode, and whole-stage
        # code for a projection over tens of columns (the job's cleaning step) is bigger than
        # that: it would run interpreted, several times slower. At this limit Spark falls back
        # to compiled expressions per operator instead (the value Spark's docs advise on
        # HotSpot; Spark's own default is the JVM's maximum, 65535).
        .config("spark.sql.codegen.hugeMethodLimit", "8000")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.python.worker.reuse", "true")
        .config("spark.executorEnv.PYTHONPATH", os.environ["PYTHONPATH"])
    )
    if _LOG4J_CONFIG.is_file():
        # Spark's default log4j profile prints banners and WARN lines around the job's output.
        builder = builder.config("spark.driver.extraJavaOptions",
                                 f"-Dlog4j.configurationFile=file:{_LOG4J_CONFIG}")
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    log.debug("spark session ready: master=%s, driver %s (bound to %s)", master, driver_host,
              driver_bind)
    return session


def spark_error_reason(exc: BaseException) -> str:
    """One readable line out of a Spark failure.

    A Python exception raised inside a task reaches the driver wrapped in a JVM stack trace;
    the line that matters is the last ``SomeError: message`` line of the Python traceback.
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head and "at " not in head[:3]:
            if not head.startswith(("org.", "java.", "py4j.", "scala.")):
                return line
    return lines[0] if lines else type(exc).__name__

"""The batch layer as system of record: the not-worse policy, generations with pins, the run
record on the metrics topic, and an S3 outage in the middle of a run.

Real parts throughout: the session's Kafka broker, S3 servers (the outage test starts one of
its own so that it can stop it) and local Spark.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pytest
import s3fs

from app.settings import Settings
from devstack.stack import DEFAULT_CACHE_DIR, LocalStack, free_port
from batch.job import EXIT_REJECTED, JobConfig, run_job
from models.registry import Registry
from devstack.harness import announce, consume_until, publish_small_model, run, write_dataset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def xor_table(n: int = 3000, seed: int = 0) -> pa.Table:
    """A label a network learns (the sign of x * y) and a linear model barely does."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    label = np.where(x * y > 0, "pos", "neg")
    hint = (label == "pos") + rng.normal(0, 1.5, n)  # a weak linear signal
    return pa.table({"id": [f"e{i}" for i in range(n)], "x": x, "y": y, "hint": hint,
                     "label": label})



GOOD = dict(hidden=(32, 16), dropout=0.0, epochs=25, batch_size=64, lr=0.01, patience=5)


def test_a_candidate_worse_than_the_active_model_is_not_published(
        spark: Any, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    settings = Settings.from_env(settings_env())
    uri = write_dataset(settings, "xor", xor_table())
    registry = Registry(settings.registry_uri, settings.storage_options)

    first = run_job(settings, JobConfig(data_uri=uri, **GOOD), spark=spark)
    assert first.published and first.active_version is None
    assert first.metrics["accuracy"] > 0.85

    # A logistic regression cannot learn x * y: it beats the majority rate through the weak
    # hint, but it is worse than the network that serves now, on the very same test rows.
    linear = JobConfig(data_uri=uri, **{**GOOD, "hidden": (), "epochs": 3})
    rejected = run_job(settings, linear, spark=spark)
    assert not rejected.published and rejected.exit_code == EXIT_REJECTED
    assert rejected.active_version == first.ref.version
    assert "worse than the active model" in rejected.decision.reason
    assert rejected.active_metrics["accuracy"] == pytest.approx(first.metrics["accuracy"],
                                                                abs=1e-6)
    assert registry.versions(settings.model_name) == [first.ref.version]
    updates = run(consume_until(kafka_broker.bootstrap, settings.updates_topic,
                                lambda values: len(values) >= 1))
    assert [m["version"] for m in updates if m["type"] == "MODEL-REF"] == [first.ref.version]

    # With the comparison switched off the same candidate passes.
    relaxed = run_job(settings, dataclasses.replace(linear, compare_active=False,
                                                    announce=False), spark=spark)
    assert relaxed.published


def test_an_active_model_that_cannot_be_scored_rejects_the_candidate(
        spark: Any, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    """Fail closed: a candidate that cannot be compared with the serving model is not
    published; it might be worse. Here the serving model predicts other classes."""
    settings = Settings.from_env(settings_env())
    registry = Registry(settings.registry_uri, settings.storage_options)
    active = publish_small_model(registry, "default", ["x", "y", "hint"], ["no", "yes"])
    run(announce(kafka_broker.bootstrap, settings.updates_topic, active.to_message()))
    uri = write_dataset(settings, "xor", xor_table(1500, seed=3))
    lines: list[str] = []
    result = run_job(settings, JobConfig(data_uri=uri, announce=False,
                                         **{**GOOD, "epochs": 2}),
                     spark=spark, progress=lines.append)
    assert not result.published and result.exit_code == EXIT_REJECTED
    assert result.active_version == active.version
    assert result.decision.reason.startswith(
        f"cannot compare with the active model {active.version}: the active model's classes")
    assert any(line.startswith("candidate rejected: cannot compare") for line in lines)
    assert registry.versions("default") == [active.version]


def test_an_announced_version_whose_artifact_is_bad_is_not_the_active_model(
        spark: Any, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    """A version that does not verify serves nowhere (workers refuse it and fall back), so the
    candidate is compared with the version they fall back to: here the one before it."""
    settings = Settings.from_env(settings_env())
    registry = Registry(settings.registry_uri, settings.storage_options)
    older = publish_small_model(registry, "default", ["x", "y", "hint"], ["neg", "pos"])
    newer = publish_small_model(registry, "default", ["x", "y", "hint"], ["neg", "pos"], seed=1)
    for ref in (older, newer):
        run(announce(kafka_broker.bootstrap, settings.updates_topic, ref.to_message()))
    fs = s3fs.S3FileSystem(**settings.storage_options)
    fs.pipe_file(newer.manifest_uri.rsplit("/", 1)[0] + "/model.pt", b"not a state dict")
    uri = write_dataset(settings, "xor", xor_table(1500, seed=3))
    lines: list[str] = []
    result = run_job(settings, JobConfig(data_uri=uri, announce=False,
                                         **{**GOOD, "epochs": 2}),
                     spark=spark, progress=lines.append)
    assert result.active_version == older.version
    assert result.active_metrics is not None  # compared with the fallback on the test rows
    assert any(f"refused (artifact does not verify): ['{newer.version}']" in line
               for line in lines)


def test_generations_keep_the_newest_the_active_and_the_pinned_version(
        spark: Any, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    settings = Settings.from_env(settings_env())
    registry = Registry(settings.registry_uri, settings.storage_options)
    old = [publish_small_model(registry, "default", ["x", "y", "hint"], ["neg", "pos"], seed=i)
           for i in range(3)]
    for ref in old:
        run(announce(kafka_broker.bootstrap, settings.updates_topic, ref.to_message()))
    # An operator pins the first version; the third is the newest announced one.
    run(announce(kafka_broker.bootstrap, settings.updates_topic,
                 {"type": "PIN", "model": "default", "version": old[0].version}))
    uri = write_dataset(settings, "xor", xor_table(1500, seed=1))
    lines: list[str] = []
    result = run_job(settings, JobConfig(data_uri=uri, keep_versions=1, compare_active=False,
                                         **{**GOOD, "epochs": 2}),
                     spark=spark, progress=lines.append)
    assert result.published
    assert result.pruned == [old[1].version]
    assert registry.versions("default") == [old[0].version, old[2].version, result.ref.version]
    assert any("active model: " + old[0].version in line and "pinned" in line
               for line in lines)


def _lines_until(proc: subprocess.Popen[str], marker: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"the run ended before {marker!r}:\n{''.join(seen)}")


def test_s3_down_mid_run_fails_clearly_announces_nothing_and_keeps_the_active_model(
        tmp_path: Path, settings_env: Callable[..., dict[str, str]], kafka_broker: Any) -> None:
    from demo.data import write_lake

    port = free_port()
    data_dir = tmp_path / "s3"
    own = LocalStack(cache_dir=DEFAULT_CACHE_DIR, data_dir=data_dir, with_kafka=False,
                     s3_port=port).start()
    try:
        env = settings_env(S3_ENDPOINT_URL=own.s3_endpoint_url, LAKE_URI="s3://outage/lake",
                           REGISTRY_URI="s3://outage/models", AWS_MAX_ATTEMPTS="1",
                           BATCH_HIDDEN="16", BATCH_EPOCHS="3", BATCH_LOCK_TTL_S="60")
        settings = Settings.from_env(env)
        registry = Registry(settings.registry_uri, settings.storage_options)
        write_lake(settings.lake_uri, settings.storage_options, 3000, seed=2)
        from demo.data import FEATURES
        active = publish_small_model(registry, "default", FEATURES, ["b", "s"])
        run(announce(kafka_broker.bootstrap, settings.updates_topic, active.to_message()))

        proc = subprocess.Popen([sys.executable, "-m", "batch", "run"], cwd=REPO,
                                env={**os.environ, **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        seen: list[str] = []
        try:
            _lines_until(proc, "] train ...", seen)
            own.stop()  # the S3 endpoint goes away while the candidates train
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode not in (0, 3), "".join(seen) + out + err
        errors = [line for line in err.splitlines() if line.startswith("batch: error:")]
        assert len(errors) == 1 and "cannot publish default" in errors[0], err
        assert "published" not in out

        updates = run(consume_until(kafka_broker.bootstrap, settings.updates_topic,
                                    lambda values: len(values) >= 1))
        assert [m.get("version") for m in updates] == [active.version]
        records = run(consume_until(kafka_broker.bootstrap, settings.metrics_topic,
                                    lambda values: any(v.get("type") == "batch-run"
                                                       for v in values)))
        (record,) = [r for r in records if r.get("type") == "batch-run"]
        assert record["status"] == "failed" and record["exit_code"] == 1
        assert "cannot publish default" in record["reason"]
        assert {"read", "train", "evaluate"} <= set(record["timings"])
    finally:
        own.stop()

    # The store comes back as it was: the active version is the only one and still loads.
    with LocalStack(cache_dir=DEFAULT_CACHE_DIR, data_dir=data_dir, with_kafka=False,
                    s3_port=port):
        assert registry.versions("default") == [active.version]
        registry.load_ref(active)


_CONTENDER = """
import json, sys
from batch.errors import LockError
from batch.lock import RegistryLock

lock = RegistryLock(sys.argv[1], json.loads(sys.argv[2]), "default", ttl_s=60, settle_s=0.5)
print("ready", flush=True)
sys.stdin.readline()  # every contender is started before any of them writes
try:
    lock.acquire()
except LockError as exc:
    print("refused", lock.token, exc, flush=True)
    sys.exit(0)
print("held", lock.token, flush=True)
sys.stdin.readline()  # hold the lock until told
lock.release()
print("released", flush=True)
"""


def test_of_runs_racing_for_the_lock_in_separate_processes_on_s3_exactly_one_goes_on(
        s3_server: Any) -> None:
    """Separate processes with their own S3 clients stand for separate machines: the lock
    lives on the real S3-API server (which ignores If-None-Match), so only the read-back
    after the settle time can tell the winner, and it must tell exactly one."""
    bucket = s3_server.make_bucket()
    registry = f"s3://{bucket}/registry"
    options = json.dumps(s3_server.storage_options)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _round in range(3):  # the race is run three times over
        contenders = [subprocess.Popen([sys.executable, "-c", _CONTENDER, registry, options],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env, cwd=REPO) for _ in range(3)]
        try:
            for proc in contenders:
                assert proc.stdout.readline().strip() == "ready"
            for proc in contenders:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            outcomes = [proc.stdout.readline().strip().split(" ", 2) for proc in contenders]
            held = [o for o in outcomes if o[0] == "held"]
            refused = [o for o in outcomes if o[0] == "refused"]
            assert len(held) == 1 and len(refused) == 2, outcomes
            for o in refused:
                assert "another batch run of 'default'" in o[2]
            fs = s3fs.S3FileSystem(**s3_server.storage_options)
            lock_object = f"{bucket}/registry/_locks/default.json"
            assert json.loads(fs.cat_file(lock_object))["token"] == held[0][1]
            winner = contenders[[o[0] for o in outcomes].index("held")]
            winner.stdin.write("done\n")
            winner.stdin.flush()
            assert winner.stdout.readline().strip() == "released"
            fs.invalidate_cache()
            assert not fs.exists(lock_object)
        finally:
            for proc in contenders:
                proc.stdin.close()
                assert proc.wait(timeout=60) == 0
                proc.stdout.close()


def test_a_lock_overwritten_between_writing_and_confirming_is_refused(s3_server: Any) -> None:
    """The job writes the lock, lists the lake and only then confirms: a racing run whose
    write landed last in the meantime wins, and the first run stops before reading data."""
    bucket = s3_server.make_bucket()
    registry = f"s3://{bucket}/registry"
    from batch.errors import LockError
    from batch.lock import RegistryLock

    first = RegistryLock(registry, s3_server.storage_options, "default", settle_s=0.2)
    first.acquire(confirm=False)
    second = RegistryLock(registry, s3_server.storage_options, "default", settle_s=0.2)
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.pipe_file(f"{bucket}/registry/_locks/default.json", second._body())  # its racing write
    with pytest.raises(LockError, match="took the lock at the same time"):
        first.confirm()
    first.release()  # not held: the other run's lock stays
    assert json.loads(fs.cat_file(f"{bucket}/registry/_locks/default.json"))[
        "token"] == second.token


def test_a_run_whose_lock_is_taken_over_stops_before_publishing(
        spark: Any, settings_env: Callable[..., dict[str, str]]) -> None:
    """A run that stalled past its lock's expiry may find the lock taken over by the next run:
    it must stop before it writes a manifest, announces or prunes, and leave the successor's
    lock alone."""
    from batch.errors import LockError, LockLostError
    from batch.lock import RegistryLock, lock_uri

    settings = Settings.from_env(settings_env())
    registry = Registry(settings.registry_uri, settings.storage_options)
    uri = write_dataset(settings, "xor", xor_table(1500, seed=4))
    fs = s3fs.S3FileSystem(**settings.storage_options)
    lock_object = lock_uri(settings.registry_uri, "default")
    successor = RegistryLock(settings.registry_uri, settings.storage_options, "default")

    def progress(line: str) -> None:
        if line == "train ...":  # the successor takes the lock over while this run trains
            fs.pipe_file(lock_object, successor._body())

    with pytest.raises(LockLostError, match="lost the run lock of 'default'") as raised:
        run_job(settings, JobConfig(data_uri=uri, **{**GOOD, "epochs": 2}), spark=spark,
                progress=progress)
    assert isinstance(raised.value, LockError)
    assert "train" in raised.value.timings and "announce" not in raised.value.timings
    assert registry.versions("default") == []
    fs.invalidate_cache()
    assert not fs.exists(f"{settings.registry_uri}/default")  # no weights left behind either
    assert json.loads(fs.cat_file(lock_object))["token"] == successor.token


def test_the_heartbeat_notices_a_lost_lock_and_never_writes_over_the_successor(
        s3_server: Any) -> None:
    from batch.errors import LockLostError
    from batch.lock import RegistryLock

    bucket = s3_server.make_bucket()
    registry = f"s3://{bucket}/registry"
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    lock_object = f"{bucket}/registry/_locks/default.json"
    lock = RegistryLock(registry, s3_server.storage_options, "default", ttl_s=3, settle_s=0.1)
    lock.acquire()
    try:
        successor = RegistryLock(registry, s3_server.storage_options, "default")
        fs.pipe_file(lock_object, successor._body())
        taken_over = fs.cat_file(lock_object)
        assert lock.lost.wait(timeout=30)  # the heartbeat runs every second
        with pytest.raises(LockLostError, match="names .* while the run went on"):
            lock.check()
    finally:
        lock.release()
    assert fs.cat_file(lock_object) == taken_over


def test_the_test_s3_server_ignores_conditional_writes(s3_server: Any) -> None:
    """What batch.lock's notes rely on: s3rver stores a PutObject whose If-Match or
    If-None-Match fails (AWS S3 answers 412), so on it a lock renewal cannot be a
    compare-and-swap and the read-backs are what tell a lost lock."""
    client = s3_server.client()
    bucket = s3_server.make_bucket()
    first = client.put_object(Bucket=bucket, Key="k", Body=b"first")["ETag"]
    client.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    client.put_object(Bucket=bucket, Key="k", Body=b"third", IfMatch=first)
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"third"

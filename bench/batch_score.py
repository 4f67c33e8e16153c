"""Batch scoring throughput: ``python -m batch score`` on a large Parquet dataset, against the
same model scoring the same rows in one process, and its numbers against a worker's
``POST /predict``.

Starts its own Kafka broker and S3 server on free ports, publishes and announces a model with
the shipped network shape (30-500-1000-500-2; scoring costs the same whatever the weights),
writes ``--rows`` demo events (Higgs schema, with missing values) as Parquet files, and then
times, in the same run:

* ``batch score``: :func:`batch.score.score_dataset` end to end on a local Spark session
  (``SPARK_MASTER``, default ``local[*]``): list, read, score in Spark tasks, write Parquet
  predictions, ``_SUCCESS``; rows/s of the whole run;
* ``raw model``: :meth:`models.loaded.LoadedModel.outputs` over the same rows held in memory in
  this process, in chunks of the task's size, on as many torch threads as Spark has cores
  (preprocessing and forward pass: no I/O, no Spark);
* ``plain torch``: the module alone on rows preprocessed beforehand.

Then a ``faust -A app worker`` serving that version answers ``POST /predict`` for a random
sample of the rows, and every answer must equal the batch prediction of the same row (version,
class and probabilities). Ends with one line holding a JSON object of the figures.

    .venv/bin/python bench/batch_score.py [--rows 1000000] [--files 8] [--sample 500] [--keep]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import s3fs  # noqa: E402
import torch  # noqa: E402

from app.settings import Settings  # noqa: E402
from batch.score import score_dataset  # noqa: E402
from demo.data import FEATURES, generate  # noqa: E402
from devstack.harness import (WorkerProcess, announce, http, publish_small_model,  # noqa: E402
                              scratch_dir)
from devstack.stack import LocalStack, free_port  # noqa: E402
from models.registry import Registry  # noqa: E402
from transport.topics import ensure_topics  # noqa: E402


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def write_dataset(fs: s3fs.S3FileSystem, uri: str, rows: int, files: int) -> np.ndarray:
    """``rows`` demo events in ``files`` Parquet files; returns their raw features."""
    per_file = -(-rows // files)
    parts = []
    for i in range(files):
        n = min(per_file, rows - i * per_file)
        frame = generate(n, seed=100 + i)
        frame.insert(0, "id", [f"r{i}-{j}" for j in range(n)])
        frame = frame.drop(columns=[c for c in ("Label", "label") if c in frame.columns])
        with fs.open(f"{uri}/part-{i:03d}.parquet", "wb") as out:
            frame.to_parquet(out, index=False)
        parts.append(frame[FEATURES].to_numpy(dtype=np.float64))
    return np.concatenate(parts)


def in_process(model: Any, X: np.ndarray, threads: int, chunk: int = 8192) -> dict[str, float]:
    """Rows/s of the raw model (preprocessing + forward) and of plain torch (forward only)."""
    torch.set_num_threads(threads)
    began = time.perf_counter()
    for start in range(0, len(X), chunk):
        model.outputs(X[start:start + chunk])
    raw = len(X) / (time.perf_counter() - began)
    ready = [torch.from_numpy(model.preprocessor.transform(X[s:s + chunk]))
             for s in range(0, len(X), chunk)]
    began = time.perf_counter()
    with torch.inference_mode():
        for batch in ready:
            torch.softmax(model.module(batch), dim=1)
    plain = len(X) / (time.perf_counter() - began)
    return {"raw_model_rows_per_s": round(raw), "plain_torch_rows_per_s": round(plain)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    figures: dict[str, Any] = {"rows": args.rows, "files": args.files, "load_before": load(),
                               "cores": os.cpu_count()}
    with scratch_dir("stratum-bench-score-", args.keep) as work, \
            LocalStack(data_dir=work / "stack", s3_buckets=["bench"]) as stack:
        env = {**stack.environment("bench"), "WEB_PORT": str(free_port()),
               "STRATUM_DATA_DIR": str(work / "worker"), "SPEED_LAYER": "0",
               "ARCHIVE": "0"}
        settings = Settings.from_env(env)
        registry = Registry(settings.registry_uri, settings.storage_options)
        ref = publish_small_model(registry, settings.model_name, list(FEATURES), ["b", "s"],
                                  hidden=(500, 1000, 500))
        asyncio.run(ensure_topics(settings))
        asyncio.run(announce(settings.bootstrap_servers, settings.updates_topic,
                             ref.to_message()))
        fs = s3fs.S3FileSystem(**settings.storage_options)
        data_uri = "s3://bench/score-in"
        began = time.monotonic()
        X = write_dataset(fs, data_uri, args.rows, args.files)
        say(f"wrote {args.rows} rows in {args.files} files in {time.monotonic() - began:.0f}s; "
            f"load {load()}")

        from batch.spark import get_session

        spark = get_session(master=settings.spark_master)
        cores = spark.sparkContext.defaultParallelism
        out_uri = "s3://bench/score-out/run"
        figures["load_at_score"] = load()
        result = score_dataset(settings, data_uri, out_uri, spark=spark, progress=say)
        figures["batch_score"] = {"rows": result.rows, "seconds": round(result.seconds, 2),
                                  "rows_per_s": round(result.rows_per_second),
                                  "files": result.files, "spark_cores": cores}
        assert result.rows == args.rows, (result.rows, args.rows)

        model = registry.load_ref(ref)
        figures["load_in_process"] = load()
        figures.update(in_process(model, X, threads=cores))
        for peer in ("raw_model_rows_per_s", "plain_torch_rows_per_s"):
            figures[f"batch_score_vs_{peer.removesuffix('_rows_per_s')}"] = round(
                figures["batch_score"]["rows_per_s"] / figures[peer], 3)
        say(f"batch score {figures['batch_score']['rows_per_s']} rows/s; raw model "
            f"{figures['raw_model_rows_per_s']}/s; plain torch "
            f"{figures['plain_torch_rows_per_s']}/s; load {load()}")

        scored = pq.ParquetDataset(out_uri.removeprefix("s3://"), filesystem=fs).read(
            columns=["id", "predicted", "probabilities", "model_version"]).to_pylist()
        by_id = {row["id"]: row for row in scored}
        assert len(by_id) == args.rows
        worker = WorkerProcess(env, work / "worker.log").start()
        try:
            worker.wait_ready()
            rng = np.random.default_rng(1)
            ids = list(by_id)
            picks = [ids[i] for i in rng.choice(len(ids), size=args.sample, replace=False)]
            per_file = -(-args.rows // args.files)
            requests = []
            for pick in picks:
                i, j = (int(p) for p in pick[1:].split("-"))
                values = X[i * per_file + j]
                requests.append({"id": pick, "features": dict(zip(
                    FEATURES, [None if np.isnan(v) else float(v) for v in values]))})
            status, answers, _ = http("POST", f"{worker.url}/predict", requests)
            assert status == 200, answers
            differ = [a["id"] for a in answers
                      if (a["model_version"], a["predicted"], a["probabilities"])
                      != (by_id[a["id"]]["model_version"], by_id[a["id"]]["predicted"],
                          by_id[a["id"]]["probabilities"])]
        finally:
            worker.stop()
        figures["predict_sample"] = {"rows": len(picks), "differ": len(differ)}
        say(f"POST /predict on {len(picks)} sampled rows: {len(differ)} differ from batch score")
        spark.stop()
    figures["load_after"] = load()
    print(json.dumps(figures))
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the commands print: plain functions from the worker's JSON bodies to text lines.

Nothing here talks to a worker or a broker, so each view is tested on its own.
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable, Mapping, Sequence

#: Characters of a dead letter's raw value shown by ``tail dlq`` (``--json`` shows it all).
RAW_SHOWN = 160


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], indent: str = "") -> list[str]:
    """Rows as left-aligned columns under ``headers``."""
    cells = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [indent + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()
            for row in cells]


def cell(value: Any) -> str:
    """One value in a table: ``-`` for none, numbers to 4 significant decimals."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def clock(epoch_s: float | None) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SSZ`` (UTC)."""
    if epoch_s is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch_s))


def record(entry: Mapping[str, Any] | None) -> str:
    """A swap or refusal record of ``GET /models/`` as one phrase."""
    if not entry:
        return "none"
    text = f"{entry.get('kind', '?')} {entry.get('version')} at {clock(entry.get('at'))}"
    if entry.get("load_s") is not None:
        text += f" (loaded in {float(entry['load_s']):.2f}s)"
    if entry.get("reason"):
        text += f": {entry['reason']}"
    return text


def worker_lines(worker: Mapping[str, Any]) -> list[str]:
    """One worker's part of ``stratum status``."""
    url = worker["url"]
    if worker.get("error"):
        return [f"worker {url}: unreachable: {worker['error']}"]
    ready = "ready" if worker.get("ready") else f"not ready ({worker.get('ready_error')})"
    lines = [f"worker {url}: {ready}"]
    models = worker.get("models") or {}
    active = models.get("active")
    task = models.get("task")
    lines.append(f"  model         {models.get('model')}" + (f" ({task})" if task else ""))
    if active:
        seq = models.get("update_seq")
        detail = f"base {models.get('base_version')}, update {seq}" if seq else \
            f"base {models.get('base_version')}, no update"
        lines.append(f"  serving       {active} ({detail})")
    else:
        lines.append("  serving       nothing yet")
    lines.append(f"  pinned        {models.get('pinned') or 'no'}")
    lines.append(f"  last swap     {record(models.get('last_swap'))}")
    lines.append(f"  last refusal  {record(models.get('last_refusal'))}")
    if "predictions_per_s" in worker:
        rate = worker["predictions_per_s"]
        lines.append(f"  predictions/s {'-' if rate is None else f'{rate:.1f}'}")
    return lines


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """``stratum status``: every worker, events and quality per version, any rollout."""
    lines: list[str] = []
    for worker in status["workers"]:
        lines.extend(worker_lines(worker))
    scored: Mapping[str, Any] = status.get("scored_by_version") or {}
    lines.append("")
    lines.append("events scored per version")
    if scored:
        lines.extend(table(["VERSION", "EVENTS"], sorted(scored.items()), indent="  "))
    else:
        lines.append("  none yet")
    lines.append("")
    lines.append("quality per version (labelled events)")
    lines.extend(quality_lines(status.get("quality_by_version") or {}))
    if status.get("rollout") is not None:
        lines.append("")
        lines.append("rollout")
        lines.extend(rollout_lines(status["rollout"]))
    return lines


def quality_lines(quality: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Rows of ``quality_by_version``: accuracy and log loss, or a regression's RMSE."""
    if not quality:
        return ["  none yet"]
    lines: list[str] = []
    by_task: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for version, row in sorted(quality.items()):
        by_task.setdefault(str(row.get("task", "classification")), []).append((version, row))
    for task, rows in sorted(by_task.items()):
        if task == "regression":
            lines.extend(table(
                ["VERSION", "N", "RMSE", "MAE", "R2", "ROLLING RMSE"],
                ([v, r.get("n"), r.get("rmse"), r.get("mae"), r.get("r2"),
                  r.get("rolling_rmse")] for v, r in rows), indent="  "))
        else:
            lines.extend(table(
                ["VERSION", "N", "ACCURACY", "LOG LOSS", "ROLLING ACC", "ROLLING LOSS"],
                ([v, r.get("n"), r.get("accuracy"), r.get("log_loss"),
                  r.get("rolling_accuracy"), r.get("rolling_log_loss")] for v, r in rows),
                indent="  "))
    return lines


def rollout_lines(rollout: Any) -> list[str]:
    """A ``rollout`` of ``GET /models/``, whatever its shape: its fields one per line."""
    if not isinstance(rollout, Mapping):
        return [f"  {cell(rollout)}"]
    if not rollout:
        return ["  none"]
    width = max(len(str(k)) for k in rollout)
    return [f"  {str(k).ljust(width)}  {cell(v)}" for k, v in rollout.items()]


def models_lines(models: Mapping[str, Any]) -> list[str]:
    """``stratum models``: announced versions (oldest first), which serves, pin, refusals."""
    announced: list[str] = list(models.get("announced") or [])
    refused: Mapping[str, str] = models.get("refused") or {}
    base, pinned = models.get("base_version"), models.get("pinned")
    rows = []
    for version in announced:
        state = []
        if version == base:
            state.append(f"serving as {models.get('active')}"
                         if models.get("active") != version else "serving")
        if version == pinned:
            state.append("pinned")
        if version in refused:
            state.append(f"refused: {refused[version]}")
        rows.append([version, ", ".join(state) or "-"])
    for version, reason in refused.items():
        if version not in announced:
            rows.append([version, f"refused: {reason}"])
    lines = [f"model {models.get('model')}"
             + (f" ({models.get('task')})" if models.get("task") else "")
             + f": serving {models.get('active') or 'nothing'}"
             + (f", pinned {pinned}" if pinned else ", not pinned")]
    if rows:
        lines.extend(table(["VERSION", "STATE"], rows))
    else:
        lines.append("no version announced")
    if models.get("rollout") is not None:
        lines.append("rollout")
        lines.extend(rollout_lines(models["rollout"]))
    return lines


def top(prediction: Mapping[str, Any]) -> Any:
    """A prediction's top probability, or a regression's value."""
    probabilities = prediction.get("probabilities")
    if isinstance(probabilities, list) and probabilities:
        return max(probabilities)
    return prediction.get("predicted")


def predictions_table(predictions: Sequence[Mapping[str, Any]]) -> list[str]:
    """Predictions as a table: id, predicted, top probability (or the value), version."""
    regression = all("probabilities" not in p for p in predictions)
    return table(["ID", "PREDICTED", "VALUE" if regression else "P", "VERSION"],
                 ([p.get("id"), p.get("predicted"), top(p), p.get("model_version")]
                  for p in predictions))


def prediction_line(message: Mapping[str, Any]) -> str:
    """One message of the output topic, for ``tail predictions``."""
    probabilities = message.get("probabilities")
    shown = (f"p={max(probabilities):.4f}" if isinstance(probabilities, list) and probabilities
             else "")
    ts = message.get("ts")
    when = clock(ts / 1000) if isinstance(ts, (int, float)) else "-"
    return " ".join(part for part in (
        when, str(message.get("id")), f"predicted={cell(message.get('predicted'))}", shown,
        f"version={message.get('model_version')}") if part)


def dead_letter_line(message: Mapping[str, Any]) -> str:
    """One dead letter, for ``tail dlq``: its source, its reason and the start of its value."""
    source = message.get("source") or {}
    where = f"{source.get('topic')}[{source.get('partition')}]@{source.get('offset')}"
    raw = str(message.get("raw", ""))
    if message.get("raw_encoding") == "base64":
        raw = f"(base64) {raw}"
    shown = json.dumps(raw[:RAW_SHOWN]) + ("..." if len(raw) > RAW_SHOWN
                                           or message.get("raw_truncated") else "")
    return f"{where} error={message.get('error')!s} raw={shown}"

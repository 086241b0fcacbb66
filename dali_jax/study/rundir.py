"""What a run directory says about its run, read from its files only (checkpoints/,
eval_summary.json, eval/returns.json, metrics.jsonl): the one place every part of the study
runner reads a run's progress from.

A run directory without checkpoints/ but with eval_summary.json is a copy of a finished
run's results (e.g. committed under results/): its final step is the env_steps that
eval_summary.json records, so `report` works on such copies."""
from __future__ import annotations

import json
import os


def latest_checkpoint_step(logdir: str) -> int | None:
    """Step of the newest complete checkpoint (``checkpoints/ckpt_<step>``), or None."""
    d = os.path.join(logdir, "checkpoints")
    try:
        names = os.listdir(d)
    except OSError:
        return None
    steps = [int(n[5:]) for n in names if n.startswith("ckpt_") and n[5:].isdigit()]
    return max(steps) if steps else None


def final_step(logdir: str) -> int | None:
    """The newest checkpoint's step; for a copy of the results without checkpoints/, the
    env_steps recorded in eval_summary.json; None when neither is there."""
    if os.path.isdir(os.path.join(logdir, "checkpoints")):
        return latest_checkpoint_step(logdir)
    try:
        with open(os.path.join(logdir, "eval_summary.json")) as f:
            return int(json.load(f)["env_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_finished(logdir: str, steps: int) -> bool:
    """The trainer reached ``steps`` and wrote its final summary (eval_summary.json is written
    only when the loop ends without a stop request)."""
    step = final_step(logdir)
    return (step is not None and step >= steps
            and os.path.isfile(os.path.join(logdir, "eval_summary.json")))


def read_eval_results(logdir: str) -> dict | None:
    """``eval/returns.json`` of a run, or None when missing or unreadable."""
    try:
        with open(os.path.join(logdir, "eval", "returns.json")) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def evaluated(logdir: str, episodes: int, indices, after: float = 0.0) -> bool:
    """The run's grid results are of its latest checkpoint, with ``episodes`` episodes on at
    least the grid contexts ``indices`` (and written after time ``after``)."""
    path = os.path.join(logdir, "eval", "returns.json")
    if after and (not os.path.exists(path) or os.path.getmtime(path) < after):
        return False
    d = read_eval_results(logdir)
    if d is None or d.get("checkpoint_step") != final_step(logdir):
        return False
    if d.get("episodes") != episodes:
        return False
    have = {c.get("index") for c in d.get("contexts", []) if isinstance(c, dict)}
    return set(indices) <= have


def first_and_last_record(path: str, max_bytes: int = 1 << 20) -> tuple[dict | None, dict | None]:
    """First and last JSON record of a JSONL file (reading at most ``max_bytes`` of its end)."""
    try:
        with open(path, "rb") as f:
            first = _parse(f.readline())
            size = os.path.getsize(path)
            f.seek(max(0, size - 65536))
            tail = f.read().splitlines()
    except OSError:
        return None, None
    last = next((r for r in map(_parse, reversed(tail)) if r), None)
    return first, last


def _parse(line: bytes) -> dict | None:
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) and "step" in r else None


def last_metrics(logdir: str, key: str = "eval/return_mean",
                 max_bytes: int = 2 << 20) -> tuple[int, float | None]:
    """(last logged env step, last value of ``key``) from the end of metrics.jsonl, reading
    backwards at most ``max_bytes``."""
    path = os.path.join(logdir, "metrics.jsonl")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(0, size - max_bytes))
            lines = f.read().splitlines()
    except OSError:
        return 0, None
    step, value = 0, None
    for line in reversed(lines):
        if key.encode() not in line and step:
            continue
        r = _parse(line)
        if r is None:
            continue
        step = step or int(r["step"])
        if key in r:
            value = float(r[key])
            break
    return step, value

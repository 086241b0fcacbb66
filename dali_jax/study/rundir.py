"""What a run directory says about its run, read from its own files only: checkpoints/,
eval_summary.json, eval/returns.json, metrics.jsonl, run.lock, and the one-line JSON headers
the runner writes around each attempt into train.log and eval.log (docs/cluster.md)::

    === train start {"time", "host", "pid", "step", "cmd"}
    === train end {"time", "returncode", "outcome": done | interrupted | failed, "error", "step"}
    === train queued {"time", "job_id", "cluster", "folder"}         (slurm backend)

A start without an end means the launcher died. A copy of a finished run's results without
checkpoints/ (e.g. under results/) ends at the env_steps of its eval_summary.json.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re

from dali_jax.analysis.curves import read_metrics

LOCK = "run.lock"  # held by the job (launcher and child) that trains or evaluates the run
STATES = ("done", "running", "queued", "failed", "interrupted", "pending")
_HEADER = re.compile(r"=== (\S+) (\S+) (.*)")


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _read_json(path: str):
    try:
        with open(path) as f:
            return _json(f.read())
    except OSError:
        return None


def latest_checkpoint_step(logdir: str) -> int | None:
    """Step of the newest complete checkpoint (``checkpoints/ckpt_<step>``), or None."""
    try:
        names = os.listdir(os.path.join(logdir, "checkpoints"))
    except OSError:
        return None
    steps = [int(n[5:]) for n in names if n.startswith("ckpt_") and n[5:].isdigit()]
    return max(steps) if steps else None


def final_step(logdir: str) -> int | None:
    """The newest checkpoint's step; for a copy without checkpoints/, eval_summary.json's
    env_steps; None when neither is there."""
    if os.path.isdir(os.path.join(logdir, "checkpoints")):
        return latest_checkpoint_step(logdir)
    summary = _read_json(os.path.join(logdir, "eval_summary.json"))
    try:
        return int(summary["env_steps"])
    except (TypeError, KeyError, ValueError):
        return None


def training_finished(logdir: str, steps: int) -> bool:
    """The trainer reached ``steps`` and wrote eval_summary.json (written only when its loop
    ends without a stop request)."""
    step = final_step(logdir)
    return (step is not None and step >= steps
            and os.path.isfile(os.path.join(logdir, "eval_summary.json")))


def read_eval_results(logdir: str) -> dict | None:
    """``eval/returns.json`` of a run, or None when missing or unreadable."""
    d = _read_json(os.path.join(logdir, "eval", "returns.json"))
    return d if isinstance(d, dict) else None


def evaluated(logdir: str, episodes: int, indices) -> bool:
    """The grid results are of the final checkpoint, with ``episodes`` episodes on at least
    the grid contexts ``indices``."""
    d = read_eval_results(logdir)
    if d is None or (d.get("checkpoint_step"), d.get("episodes")) != (final_step(logdir),
                                                                        episodes):
        return False
    return set(indices) <= {c.get("index") for c in d.get("contexts", []) if isinstance(c, dict)}


# ----------------------------------------------------------------------------- job logs
def header(kind: str, event: str, record: dict) -> str:
    """One header line of a job's log."""
    return f"=== {kind} {event} {json.dumps(record)}\n"


def log_events(path: str) -> list[tuple[str, str, dict]]:
    """(kind, event, record) of every header line in the log at ``path``, in order."""
    try:
        with open(path, "rb") as f:
            found = [_HEADER.match(ln.decode(errors="replace")) for ln in f if ln[:4] == b"=== "]
    except OSError:
        return []
    return [(m[1], m[2], rec) for m in found if m and isinstance(rec := _json(m[3]), dict)]


def last_event(path: str) -> tuple[str | None, dict]:
    """(event, record) of the log's last header line; (None, {}) without one."""
    events = log_events(path)
    return (events[-1][1], events[-1][2]) if events else (None, {})


def try_lock(path: str) -> int | None:
    """An fd holding the flock at ``path`` (created if missing), or None when another holds
    it. Closing the fd releases the lock."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


def lock_held(path: str) -> bool:
    """Whether some process holds the flock at ``path`` (probed without waiting; a missing
    lock file is not created)."""
    if not os.path.exists(path):
        return False
    fd = try_lock(path)
    if fd is not None:
        os.close(fd)
    return fd is None


# ----------------------------------------------------------------------------- status
@dataclasses.dataclass
class RunStatus:
    """Where a run stands. state: one of STATES; env_steps: newest of the checkpoint and the
    metrics log; last_eval: the last periodic evaluation return; evaluation: yes (of the final
    checkpoint) | stale | running | failed | -; grid_return: mean over the evaluated grid
    contexts; error and log: the failed job's last error line and log."""

    name: str
    state: str
    env_steps: int
    target_steps: int
    last_eval: float | None
    evaluation: str
    grid_return: float | None
    error: str
    log: str


def run_status(name: str, logdir: str, steps: int, episodes: int, indices,
               job_state=None) -> RunStatus:
    """Status of the run in ``logdir`` trained for ``steps`` and evaluated with ``episodes``
    on grid ``indices``. job_state(queued record) -> "queued" | "gone" | None (unknown) asks
    the scheduler about a submitted job."""
    train_log, eval_log = os.path.join(logdir, "train.log"), os.path.join(logdir, "eval.log")
    t_event, t_rec = last_event(train_log)
    e_event, e_rec = last_event(eval_log)
    try:
        records = read_metrics(logdir)
    except FileNotFoundError:
        records = []
    evals = [r["eval/return_mean"] for r in records if "eval/return_mean" in r]
    last_eval = float(evals[-1]) if evals else None
    logged_step = int(records[-1]["step"]) if records else 0
    env_steps = max(latest_checkpoint_step(logdir) or 0, logged_step)
    held = lock_held(os.path.join(logdir, LOCK))
    # the holder evaluates when the newest start header is evaluation's
    evaluating = held and e_event == "start" and (
        t_event != "start" or e_rec.get("time", 0) > t_rec.get("time", 0))
    state, error, log = "pending", "", train_log
    if held and not evaluating:
        state = "running"
    elif training_finished(logdir, steps):
        state = "done"
    elif t_event == "queued" and (job_state is None or job_state(t_rec) != "gone"):
        state = "queued"
    elif t_event == "end" and t_rec.get("outcome") == "failed":
        state, error = "failed", t_rec.get("error", "")
    elif env_steps > 0 or t_event is not None:
        state = "interrupted"
    evaluation, grid = "-", None
    results = read_eval_results(logdir)
    if results is not None:
        means = [sum(c["returns"]) / len(c["returns"]) for c in results.get("contexts", [])
                 if c.get("returns")]
        grid = sum(means) / len(means) if means else None
        evaluation = "yes" if evaluated(logdir, episodes, indices) else "stale"
    if evaluating:
        evaluation, log = "running", eval_log
    elif e_event == "end" and e_rec.get("outcome") == "failed" and evaluation != "yes":
        evaluation, error, log = "failed", error or e_rec.get("error", ""), eval_log
    return RunStatus(name, state, env_steps, steps, last_eval, evaluation, grid, error, log)


def table(rows) -> str:
    """Rows of strings as left-aligned columns (the last column unpadded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
                     .rstrip() for row in rows)


def format_table(rows: list[RunStatus], root: str) -> str:
    """The status table (log paths relative to ``root``) and a one-line count of states."""
    out = [["run", "state", "env steps", "last eval", "grid eval", "error / log"]]
    for r in rows:
        note = os.path.relpath(r.log, root) if "running" in (r.state, r.evaluation) else ""
        if r.error:
            note = f"{r.error[:100]} ({os.path.relpath(r.log, root)})"
        grid = r.evaluation if r.grid_return is None else f"{r.evaluation} {r.grid_return:.1f}"
        out.append([r.name, r.state, f"{r.env_steps}/{r.target_steps}",
                    "-" if r.last_eval is None else f"{r.last_eval:.1f}", grid, note])
    counts = ", ".join(f"{n} {s}" for s in STATES if (n := sum(r.state == s for r in rows)))
    done = sum(r.evaluation == "yes" for r in rows)
    return table(out) + f"\n\n{len(rows)} runs: {counts}; {done} evaluated"

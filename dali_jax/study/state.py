"""Where each run of a study stands, read from its logdir (nothing is imported from JAX).

States of a run's training:
- done: the trainer reached the run's steps and wrote eval_summary.json;
- running: a process holds the run's lock (a launcher or the trainer itself);
- queued: submitted to SLURM and not started since;
- failed: the last attempt failed (its last error line and log are shown);
- interrupted: it has a checkpoint and nobody runs it (``run`` resumes it);
- pending: never started.
Its evaluation: "yes" (results of the final checkpoint), "stale" (of an older checkpoint or
other settings), "running", "failed", or "-".
"""
from __future__ import annotations

import dataclasses
import json
import os

from dali_jax.study import jobs as J
from dali_jax.study import rundir as RD

STATES = ("done", "running", "queued", "failed", "interrupted", "pending")


@dataclasses.dataclass
class RunStatus:
    """One row of ``status``. env_steps: newest of the checkpoint and the metrics log;
    last_eval: the last periodic evaluation return; grid_return: mean return over the
    evaluated grid contexts (None when not evaluated)."""

    name: str
    state: str
    env_steps: int
    target_steps: int
    last_eval: float | None
    evaluation: str
    grid_return: float | None
    error: str
    log: str


def _last(records, kind: str) -> tuple[dict | None, dict | None]:
    """(last start record, its end record or None) of ``kind``."""
    start = end = None
    for r in records:
        if r.get("kind") != kind:
            continue
        if r.get("event") == "start":
            start, end = r, None
        elif r.get("event") == "end" and start is not None and r.get("attempt") == \
                start.get("attempt"):
            end = r
    return start, end


def read_queued(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, "queued.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_status(run, steps: int, eval_episodes: int, eval_indices,
               job_state=None) -> RunStatus:
    """Status of ``run`` (a plan.Run) trained for ``steps`` and evaluated with
    ``eval_episodes`` on ``eval_indices``. job_state(queued record) -> "queued" | "gone" |
    None (unknown) asks the scheduler about a submitted job."""
    records = J.read_records(os.path.join(run.state_dir, "attempts.jsonl"))
    t_start, t_end = _last(records, "train")
    e_start, e_end = _last(records, "eval")
    log = os.path.join(run.logdir, "train.log")
    logged_step, last_eval = RD.last_metrics(run.logdir)
    env_steps = max(RD.latest_checkpoint_step(run.logdir) or 0, logged_step)
    error = ""
    held = J.lock_held(os.path.join(run.state_dir, "lock"))
    running = _read_json(os.path.join(run.state_dir, "running.json")) if held else None
    evaluating = bool(running) and running.get("kind") == "eval"
    if held and not evaluating:
        state = "running"
    elif RD.training_finished(run.logdir, steps):
        state = "done"
    elif _queued(run, t_start, job_state):
        state = "queued"
    elif t_end is not None and t_end.get("outcome") == "failed":
        state, error = "failed", t_end.get("error", "")
    elif env_steps > 0 or t_start is not None:
        state = "interrupted"
    else:
        state = "pending"
    evaluation, grid = "-", None
    results = RD.read_eval_results(run.logdir)
    if results is not None:
        grid = _mean_return(results)
        evaluation = "yes" if J.evaluated(run.logdir, eval_episodes, eval_indices) else "stale"
    if evaluating:
        evaluation, log = "running", os.path.join(run.logdir, "eval.log")
    elif e_end is not None and e_end.get("outcome") == "failed" and evaluation != "yes":
        evaluation = "failed"
        error = error or e_end.get("error", "")
        log = os.path.join(run.logdir, "eval.log")
    return RunStatus(run.name, state, env_steps, steps, last_eval, evaluation, grid, error, log)


def _queued(run, last_start: dict | None, job_state) -> bool:
    q = read_queued(run.state_dir)
    if q is None or q.get("kind") != "train":
        return False
    if last_start is not None and last_start.get("time", 0) >= q.get("time", 0):
        return False  # started since it was submitted
    return job_state is None or job_state(q) != "gone"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _mean_return(results: dict) -> float | None:
    means = [sum(c["returns"]) / len(c["returns"]) for c in results.get("contexts", [])
             if c.get("returns")]
    return sum(means) / len(means) if means else None


def format_table(rows: list[RunStatus], root: str) -> str:
    """The status table: run, state, env steps, last periodic eval, grid evaluation, and for
    failed runs the last error line and the log path (relative to ``root``)."""
    head = ["run", "state", "env steps", "last eval", "grid eval", "error / log"]
    table = [head]
    for r in rows:
        note = ""
        if r.error:
            note = f"{r.error[:100]} ({os.path.relpath(r.log, root)})"
        elif "running" in (r.state, r.evaluation):
            note = os.path.relpath(r.log, root)
        grid = r.evaluation if r.grid_return is None else f"{r.evaluation} {r.grid_return:.1f}"
        table.append([r.name, r.state, f"{r.env_steps}/{r.target_steps}",
                      "-" if r.last_eval is None else f"{r.last_eval:.1f}", grid, note])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = [("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1]).rstrip()
             for row in table]
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    evaluated = sum(r.evaluation == "yes" for r in rows)
    return "\n".join(lines + ["", f"{len(rows)} runs: {summary}; {evaluated} evaluated"])

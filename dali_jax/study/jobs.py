"""Jobs of a study (train a run, evaluate a run, compute a random-policy reference) and their
execution as child processes, shared by every backend.

A job runs while holding an exclusive ``flock`` on ``<state_dir>/lock``; the lock's file
descriptor is inherited by the child, so a run counts as running while either the launcher or
the training process lives, and a second launcher waits instead of starting it twice. Each
attempt appends two JSON lines to ``<state_dir>/attempts.jsonl``::

    {"event": "start", "kind", "name", "attempt", "host", "pid", "time", "start_step",
     "log", "log_offset", "slurm_job"}
    {"event": "end", ... the same ..., "end_time", "returncode", "outcome", "error", "end_step"}

``outcome`` is "done" (the job's completion check holds), "interrupted" (stopped by a signal;
a training run resumes from its checkpoint) or "failed" (with the last error line of the log).
A start without an end means the launcher itself died.
"""
from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

from dali_jax.study.rundir import evaluated, latest_checkpoint_step, training_finished
from dali_jax.study.spec import REPO_ROOT

KINDS = ("train", "eval", "reference")
STOP_GRACE_S = 120.0  # seconds a child gets to save its checkpoint after SIGTERM


@dataclasses.dataclass(frozen=True)
class Job:
    """One command of a study.

    kind: train | eval | reference. name: the run name (or the reference file name).
    argv: the full command. state_dir: folder of the lock and attempt records. log: file the
    command's stdout and stderr are appended to. check: completion criteria,
    ("train", logdir, steps) | ("eval", logdir, episodes, indices[, after time]) |
    ("reference", path, task, indices).
    """

    kind: str
    name: str
    argv: tuple
    state_dir: str
    log: str
    check: tuple

    @property
    def lock_path(self) -> str:
        return os.path.join(self.state_dir, "lock")

    @property
    def attempts_path(self) -> str:
        return os.path.join(self.state_dir, "attempts.jsonl")

    @property
    def running_path(self) -> str:
        return os.path.join(self.state_dir, "running.json")


# ----------------------------------------------------------------------------- completion
def reference_complete(path: str, task: str, indices) -> bool:
    """The random-policy reference file holds every grid context of ``indices``."""
    from dali_jax.analysis.normalize import ReferenceFileError, load_reference
    from dali_jax.envs import contexts as C
    try:
        ref = load_reference(path, kind="random", task=task)
    except (ReferenceFileError, KeyError):
        return False
    grid = C.evaluation_grid(task)
    return all(grid[i].values in ref for i in indices)


def is_complete(job: Job) -> bool:
    kind, target, *rest = job.check
    if kind == "train":
        return training_finished(target, rest[0])
    if kind == "eval":
        return evaluated(target, *rest)
    if kind == "reference":
        return reference_complete(target, rest[0], rest[1])
    raise ValueError(f"unknown job check {kind!r}; expected one of {', '.join(KINDS)}")


def progress_step(job: Job) -> int:
    """Env steps of the run's newest checkpoint (0 for references and fresh runs)."""
    if job.check[0] == "reference":
        return 0
    return latest_checkpoint_step(job.check[1]) or 0


# ----------------------------------------------------------------------------- lock
class JobLock:
    """Exclusive flock on ``path``; ``fd`` is passed to the child so the lock outlives a
    killed launcher while its child runs."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self, stop: Optional[threading.Event] = None, poll_s: float = 1.0,
                on_wait: Optional[Callable[[], None]] = None) -> bool:
        """Blocks until the lock is held (True) or ``stop`` is set (False)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        warned = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return True
            except BlockingIOError:
                if stop is not None and stop.is_set():
                    os.close(fd)
                    return False
                if on_wait is not None and not warned:
                    on_wait()
                    warned = True
                time.sleep(poll_s)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock_held(path: str) -> bool:
    """Whether some process holds the lock at ``path`` (probes it without waiting)."""
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- records
def read_records(job_or_path) -> list[dict]:
    """Lines of an attempts.jsonl (a Job or a path); a line cut by a crash is skipped."""
    path = job_or_path.attempts_path if isinstance(job_or_path, Job) else job_or_path
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return out


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- execution
def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the child before exec: SIGTERM when the launching thread dies (the trainer then
    saves and exits), and ignore SIGUSR2 (submitit's time-out signal is for the launcher,
    which stops the child itself)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (the trainer checkpoints and exits), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def last_error_line(log: str, offset: int = 0) -> str:
    """The last line of ``log`` (from ``offset``) that reads like an error, else its last
    non-progress line; '' when there is none."""
    try:
        with open(log, "rb") as f:
            size = os.path.getsize(log)
            f.seek(max(offset, size - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    lines = [ln for ln in lines if "%|" not in ln and not ln.startswith("===")]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt", "error")) or head == "error":
            return ln
    return lines[-1] if lines else ""


def _slurm_job() -> str | None:
    jid = os.environ.get("SLURM_ARRAY_JOB_ID")
    if jid:
        return f"{jid}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _outcome(job: Job, rc: int, stopped: bool) -> tuple[str, str]:
    if is_complete(job):
        return "done", ""
    if stopped or rc in (-signal.SIGTERM, -signal.SIGINT) or (rc == 0 and job.kind == "train"):
        return "interrupted", ""
    if rc < 0:
        return "failed", f"killed by {signal.Signals(-rc).name}"
    return "failed", ""


def execute(job: Job, env: Optional[dict] = None, stop: Optional[threading.Event] = None,
            on_start: Optional[Callable[[subprocess.Popen], None]] = None,
            on_wait: Optional[Callable[[], None]] = None) -> dict:
    """Runs ``job`` once (unless it is complete) and returns its end record; outcome
    "skipped" when it was complete, "stopped" when ``stop`` was set while waiting for the lock.

    env: extra environment variables of the child. stop: set by the launcher to interrupt
    (the child gets SIGTERM and saves). on_start: called with the child process.
    """
    lock = JobLock(job.lock_path)
    if not lock.acquire(stop=stop, on_wait=on_wait):
        return {"kind": job.kind, "name": job.name, "outcome": "stopped"}
    try:
        if is_complete(job):
            return {"kind": job.kind, "name": job.name, "outcome": "skipped"}
        return _attempt(job, lock, env, stop, on_start)
    finally:
        lock.release()


def _attempt(job, lock, env, stop, on_start) -> dict:
    records = read_records(job)
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    offset = os.path.getsize(job.log) if os.path.exists(job.log) else 0
    rec = {"kind": job.kind, "name": job.name,
           "attempt": 1 + sum(r.get("event") == "start" and r.get("kind") == job.kind
                              for r in records),
           "host": socket.gethostname(), "pid": None, "time": time.time(),
           "start_step": progress_step(job), "log": job.log, "log_offset": offset,
           "slurm_job": _slurm_job()}
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    child_env.setdefault("MUJOCO_GL", "egl")
    with open(job.log, "ab") as log:
        log.write((f"=== {job.kind} attempt {rec['attempt']} on {rec['host']} at "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')} from step {rec['start_step']}: "
                   f"{' '.join(job.argv)}\n").encode())
        log.flush()
        proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=child_env, pass_fds=(lock.fd,), preexec_fn=_child_setup)
    if on_start is not None:
        on_start(proc)
    rec["pid"] = proc.pid
    _append(job.attempts_path, {"event": "start", **rec})
    _write_json(job.running_path, rec)
    interrupted = False
    try:
        while True:
            try:
                proc.wait(1.0)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set():
                    stop_process(proc)
    except BaseException:  # KeyboardInterrupt, or submitit's exit after a checkpoint
        interrupted = True
        stop_process(proc)
        raise
    finally:
        try:
            os.remove(job.running_path)
        except OSError:
            pass
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        outcome, error = _outcome(job, rc, interrupted or (stop is not None and stop.is_set()))
        if outcome == "failed":
            line = last_error_line(job.log, offset)
            error = f"{error}: {line}" if error and line else (error or line or f"exit status {rc}")
        end = {"event": "end", **rec, "end_time": time.time(), "returncode": rc,
               "outcome": outcome, "error": error, "end_step": progress_step(job)}
        _append(job.attempts_path, end)
    return end

"""A study job (train a run, evaluate a run, compute a random-policy reference) as a locked
child process, for every backend, and the local backend: N such jobs at a time.

The job's exclusive ``flock``, inherited by the child, makes a second launcher wait instead of
starting it twice; completion is checked under the lock, so a job completes exactly once. Each
attempt is bracketed in its log by ``rundir.header`` lines. A stopped launcher (Ctrl-C,
SIGTERM, or killed outright) sends its children SIGTERM: they checkpoint, and ``run`` resumes.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import fcntl
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

from dali_jax.study import rundir as RD

# Children run in the folder holding this package, so `python -m dali_jax...` runs it.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOP_GRACE_S = 120.0  # seconds a child gets to save its checkpoint after SIGTERM
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


@dataclasses.dataclass(frozen=True)
class Job:
    """One command of a study. kind: train | eval | reference; name: the run's (or the
    reference file's); log: stdout and stderr, appended (in the run directory); done: () ->
    whether the job's results are complete, read from its files (a picklable partial)."""

    kind: str
    name: str
    argv: tuple
    log: str
    lock: str
    done: Callable[[], bool] = dataclasses.field(compare=False)


def _child_setup() -> None:
    """In the child before exec: SIGTERM when the launching thread dies (the trainer then
    saves and exits); SIGUSR2 ignored (submitit's time-out signal is for the launcher)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM (the trainer checkpoints and exits), SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def last_error_line(log: str, offset: int = 0) -> str:
    """The last line of ``log`` after ``offset`` that reads like an error, else its last line
    that is not a progress bar or a header; '' when there is none."""
    try:
        with open(log, "rb") as f:
            f.seek(max(offset, os.path.getsize(log) - 65536))
            text = f.read().decode(errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.split("\n")
             if ln.strip() and "%|" not in ln and not ln.startswith("===")]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(
        ("Error", "Exception", "Interrupt", "error"))]
    return (errors or lines or [""])[-1]


def execute(job: Job, env: Optional[dict] = None, stop: Optional[threading.Event] = None,
            on_start: Optional[Callable[[subprocess.Popen], None]] = None) -> dict:
    """Runs ``job`` once unless it is complete; -> its end record (outcome done, interrupted
    or failed), or outcome "skipped" (complete) or "stopped" (``stop`` set while waiting for
    the lock). env: extra environment of the child; stop: set by the launcher to interrupt
    (the child gets SIGTERM and saves); on_start: called with the child process."""
    while (fd := RD.try_lock(job.lock)) is None:  # another launcher runs the job: wait
        if stop is not None and stop.is_set():
            return {"outcome": "stopped"}
        time.sleep(1.0)
    try:
        if job.done():
            return {"outcome": "skipped"}
        return _attempt(job, fd, env, stop, on_start)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for a descendant still holding the inherited fd
        os.close(fd)


def _attempt(job: Job, fd: int, env, stop, on_start) -> dict:
    step = lambda: RD.latest_checkpoint_step(os.path.dirname(job.log)) or 0
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    offset = os.path.getsize(job.log) if os.path.exists(job.log) else 0
    child_env = {"MUJOCO_GL": "egl", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(job.log, "ab") as log:
        proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                cwd=PACKAGE_PARENT, env=child_env, pass_fds=(fd,),
                                preexec_fn=_child_setup)
        log.write(RD.header(job.kind, "start", {
            "time": time.time(), "host": socket.gethostname(), "pid": proc.pid,
            "step": step(), "cmd": " ".join(job.argv)}).encode())  # the child's output follows
    if on_start is not None:
        on_start(proc)
    stopped = False
    try:
        while proc.poll() is None:
            if stop is not None and stop.is_set():
                stopped = True
                stop_process(proc)
            time.sleep(0.5)
    except BaseException:  # KeyboardInterrupt, or submitit's exit after a checkpoint
        stopped = True
        stop_process(proc)
        raise
    finally:
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        outcome, error = "failed", ""
        paused = rc == 0 and job.kind == "train"  # a trainer that saved and stopped on request
        if job.done():
            outcome = "done"
        elif stopped or paused or rc in (-signal.SIGTERM, -signal.SIGINT):
            outcome = "interrupted"
        else:
            killed = f"killed by {signal.Signals(-rc).name}" if rc < 0 else ""
            error = ": ".join(x for x in (killed, last_error_line(job.log, offset)) if x)
            error = error or f"exit status {rc}"
        end = {"time": time.time(), "returncode": rc, "outcome": outcome, "error": error,
               "step": step()}
        with open(job.log, "ab") as log:
            log.write(RD.header(job.kind, "end", end).encode())
    return end


# ----------------------------------------------------------------------------- local backend
def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi: no GPUs
        return []
    return [str(i) for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("GPU ")]


def run_jobs(jobs: Sequence[Job], concurrency: int = 0, desc: str = "jobs",
             quiet: bool = False) -> list[dict]:
    """Runs ``jobs`` with ``concurrency`` workers (0: one per GPU, else one per 2 CPU cores),
    each on its own GPU, without preallocation when GPUs are shared; returns their end records
    in job order. Raises KeyboardInterrupt after a graceful stop."""
    from tqdm import tqdm

    gpus = visible_gpus()
    n = concurrency or len(gpus) or max(1, (os.cpu_count() or 1) // 2)
    shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if n > len(gpus) > 0 else {}
    slots: queue.Queue = queue.Queue()  # a job takes a free slot (its GPU) while it runs
    for s in range(n):
        slots.put(s)
    stop = threading.Event()
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=quiet or not jobs,
               dynamic_ncols=True)

    def one(job: Job) -> dict:
        if stop.is_set():
            return {"outcome": "stopped"}
        slot, t0 = slots.get(), time.time()
        try:
            env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)], **shared} if gpus else {}
            rec = execute(job, env=env, stop=stop)
        except Exception as e:  # noqa: BLE001 - reported, the other jobs go on
            rec = {"outcome": "failed", "error": f"launcher error: {type(e).__name__}: {e}"}
        finally:
            slots.put(slot)
        bar.update(1)
        if rec["outcome"] != "skipped":  # the caller reports a failure's error
            took = time.strftime("%H:%M:%S", time.gmtime(time.time() - t0))
            bar.write(f"{rec['outcome']} {job.kind} {job.name} ({took})")
        return rec

    previous = _sigterm_as_interrupt()
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(n, len(jobs))))
    try:
        futures = [pool.submit(one, job) for job in jobs]
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        stop.set()
        bar.write("stopping: the running jobs checkpoint and exit (run the command again to "
                  "resume)")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread (graceful stop); returns the
    previous handler, or None outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    return signal.signal(signal.SIGTERM, handler)

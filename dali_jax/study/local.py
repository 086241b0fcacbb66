"""The local backend: jobs as child processes, N at a time, with a progress bar over jobs.

By default one job per GPU (``CUDA_VISIBLE_DEVICES`` set to that GPU), or one per 2 CPU
cores without GPUs. Ctrl-C or SIGTERM stops the launcher gracefully: its children get SIGTERM
and checkpoint; a launcher killed outright takes its children down the same way (they get
SIGTERM when it dies), so ``run`` can always be called again.
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from typing import Sequence

from dali_jax.study import jobs as J


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("GPU ")]


def default_concurrency(gpus: Sequence[str]) -> int:
    return len(gpus) if gpus else max(1, (os.cpu_count() or 1) // 2)


def slot_env(slot: int, gpus: Sequence[str], concurrency: int) -> dict:
    """Environment of worker ``slot``: its GPU, and no preallocation when GPUs are shared."""
    if not gpus:
        return {}
    env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}
    if concurrency > len(gpus):
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def _describe(rec: dict, job: J.Job, t0: float) -> str:
    took = time.strftime("%H:%M:%S", time.gmtime(time.time() - t0))
    out = rec["outcome"]
    if out == "failed":
        return f"FAILED {job.kind} {job.name} after {took}: {rec.get('error', '')} (log: {job.log})"
    return f"{out} {job.kind} {job.name} ({took})"


def run_jobs(jobs: Sequence[J.Job], concurrency: int = 0, desc: str = "jobs",
             quiet: bool = False) -> list[dict]:
    """Runs ``jobs`` with ``concurrency`` workers (0: default_concurrency); returns their end
    records in job order. Raises KeyboardInterrupt after a graceful stop."""
    from tqdm import tqdm

    gpus = visible_gpus()
    n = concurrency or default_concurrency(gpus)
    todo: queue.Queue = queue.Queue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    done: queue.Queue = queue.Queue()
    stop = threading.Event()
    results: list = [None] * len(jobs)

    def worker(slot: int):
        env = slot_env(slot, gpus, n)
        while not stop.is_set():
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.time()
            try:
                rec = J.execute(job, env=env, stop=stop, on_wait=lambda j=job: done.put(
                    (None, f"waiting: {j.name} is run by another process", None)))
            except Exception as e:  # noqa: BLE001 - reported, the other jobs go on
                rec = {"kind": job.kind, "name": job.name, "outcome": "failed",
                       "error": f"launcher error: {type(e).__name__}: {e}"}
            done.put((i, rec, t0))

    threads = [threading.Thread(target=worker, args=(s,), daemon=True)
               for s in range(min(n, len(jobs)))]
    previous = _sigterm_as_interrupt()
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=quiet or not jobs,
               dynamic_ncols=True)
    try:
        for t in threads:
            t.start()
        finished = 0
        while finished < len(jobs):
            try:
                i, rec, t0 = done.get(timeout=0.5)
            except queue.Empty:
                if not any(t.is_alive() for t in threads):
                    break
                continue
            if i is None:
                bar.write(rec)
                continue
            results[i] = rec
            finished += 1
            bar.update(1)
            if rec["outcome"] not in ("skipped",):
                bar.write(_describe(rec, jobs[i], t0))
    except KeyboardInterrupt:
        stop.set()
        bar.write("stopping: the running jobs checkpoint and exit (run the command again to "
                  "resume)")
        for t in threads:
            t.join()
        raise
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt in the main thread (graceful stop); returns the
    previous handler, or None outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    return signal.signal(signal.SIGTERM, handler)

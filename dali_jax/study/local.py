"""The local backend: jobs as child processes, N at a time (each on its GPU), with a progress
bar. Ctrl-C or SIGTERM stops the launcher gracefully: its children get SIGTERM and checkpoint;
a launcher killed outright takes its children down the same way (they get SIGTERM when it
dies), so ``run`` can always be called again.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
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
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):  # no nvidia-smi: no GPUs
        return []
    return [str(i) for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("GPU ")]


def run_jobs(jobs: Sequence[J.Job], concurrency: int = 0, desc: str = "jobs",
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

    def one(job: J.Job) -> dict:
        if stop.is_set():
            return {"outcome": "stopped"}
        slot, t0 = slots.get(), time.time()
        try:
            env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)], **shared} if gpus else {}
            rec = J.execute(job, env=env, stop=stop)
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

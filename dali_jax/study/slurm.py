"""The slurm backend: study jobs as submitit job arrays, requeued on preemption and time-out.

Each array task runs ``JobCallable(job)`` (``jobs.execute``: the lock and log of the local
backend). At the end of the allocation submitit's USR2 calls ``checkpoint``: the trainer gets
SIGTERM, saves and exits, and a fresh callable is requeued that resumes from the checkpoint.
``backend.slurm.cluster`` "local" runs the jobs through submitit's local executor, "debug"
in this process.
"""
from __future__ import annotations

import os
import shutil
import time

from dali_jax.study import jobs as J
from dali_jax.study import rundir as RD
from dali_jax.study.spec import StudyError

try:  # a missing submitit only matters to this backend
    import submitit
except ImportError:  # pragma: no cover
    submitit = None


class JobCallable(submitit.helpers.Checkpointable if submitit else object):
    """A study job as a submitit callable; ``checkpoint`` stops the child and requeues."""

    def __init__(self, job: J.Job):
        self.job = job
        self._proc = None

    def __call__(self) -> dict:
        rec = J.execute(self.job, on_start=lambda proc: setattr(self, "_proc", proc))
        if rec["outcome"] not in ("done", "skipped"):
            raise RuntimeError(f"{self.job.kind} {self.job.name}: {rec['outcome']}: "
                               f"{rec.get('error', '')} (log: {self.job.log})")
        return rec

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before requeueing: the child saves and exits; a fresh callable
        of the same job is resubmitted."""
        if self._proc is not None:
            J.stop_process(self._proc, grace_s=60.0)
        return submitit.helpers.DelayedSubmission(JobCallable(self.job))


def executor(study, folder: str, kind: str):
    """A submitit executor for "train" or "eval" jobs (their own time limits)."""
    if submitit is None:
        raise StudyError("the slurm backend needs submitit: pip install 'submitit>=1.5,<2'")
    s = study.backend.slurm
    if s.cluster == "slurm" and shutil.which("sbatch") is None:
        raise StudyError("backend slurm: sbatch not found on PATH (not on a SLURM login "
                         "node?); use --backend local, or backend.slurm.cluster = 'local'")
    ex = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=s.cluster)
    optional = dict(mem_gb=s.mem_gb, slurm_partition=s.partition, slurm_setup=list(s.setup),
                    slurm_additional_parameters=dict(s.extra.items()))  # unset when empty
    ex.update_parameters(
        name=f"{study.name}-{kind}", nodes=1, tasks_per_node=1, stderr_to_stdout=True,
        timeout_min=int(s.time_min if kind == "train" else s.eval_time_min),
        gpus_per_node=int(s.gpus_per_node), cpus_per_task=int(s.cpus_per_task),
        slurm_array_parallelism=int(s.array_parallelism),
        **{k: v for k, v in optional.items() if v})
    return ex


def submit(study, jobs, folder: str) -> list:
    """Submits ``jobs`` as arrays (training jobs and the others have their own time limits)
    and writes a "queued" header into each job's log; -> the submitit jobs, in job order."""
    # Each job's lock is held until its queued header is written: a job that starts at once
    # waits for it, so the header comes before the job's start header.
    sjobs, held = {}, [RD.try_lock(j.lock) for j in jobs]
    try:
        for kind in ("train", "eval"):
            group = [j for j in jobs if (j.kind == "train") == (kind == "train")]
            if group:
                callables = [JobCallable(j) for j in group]
                sjobs.update(zip(group, executor(study, folder, kind).submit_array(callables)))
        for job, sj in sjobs.items():
            with open(job.log, "a") as f:
                f.write(RD.header(job.kind, "queued", {
                    "time": time.time(), "job_id": str(sj.job_id), "folder": folder,
                    "cluster": study.backend.slurm.cluster}))
    finally:
        for fd in held:
            if fd is not None:
                os.close(fd)
    return [sjobs[j] for j in jobs]


def job_states():
    """A ``job_state(queued header)`` for one status pass: "queued" (pending, running or
    requeued) or "gone" (ended), as SLURM's sacct says through submitit's watcher; None
    without sacct. One sacct call reports every job of an array, so the pass asks again only
    for a job no call reported yet: one call per array, not per run. A job of submitit's
    local or debug executor starts at once: "gone" (its lock tells whether it runs)."""
    watcher = None
    if submitit is not None and shutil.which("sacct") is not None:
        from submitit.slurm.slurm import SlurmInfoWatcher
        watcher = SlurmInfoWatcher()

    def job_state(record: dict) -> str | None:
        if record.get("cluster") != "slurm":
            return "gone"
        if watcher is None:
            return None
        job_id = str(record.get("job_id", ""))
        mode = "cache" if watcher.get_info(job_id, mode="cache") else "force"
        return "gone" if watcher.is_done(job_id, mode=mode) else "queued"
    return job_state


def wait(sjobs, jobs, desc: str, quiet: bool = False) -> list:
    """Blocks until every submitit job has ended; -> per job None (success) or its error: the
    job log's end header, else submitit's first line (e.g. a job SLURM killed)."""
    from tqdm import tqdm
    errors = []
    for sj, job in zip(tqdm(sjobs, desc=desc, unit="job", disable=quiet or not sjobs), jobs):
        e, (event, end) = sj.exception(), RD.last_event(job.log)
        if e is None:
            errors.append(None)
        elif event == "end":
            errors.append(end.get("error") or end.get("outcome"))
        else:
            errors.append(str(e).strip().split("\n")[0] or type(e).__name__)
    return errors

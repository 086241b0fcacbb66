"""The slurm backend: study jobs as submitit job arrays, requeued on preemption and time-out.

Each array task runs ``JobCallable(job)``, which runs the job's command as a child process
(``jobs.execute``: same lock, log and attempt records as the local backend). When SLURM
announces the end of the allocation (submitit's USR2, ``--signal=USR2@90``), submitit calls
``JobCallable.checkpoint``: the child gets SIGTERM, the trainer saves its checkpoint and exits,
and submitit requeues the task with a fresh callable, which resumes from that checkpoint.
The child ignores USR2 itself; on preemption SLURM's SIGTERM reaches the trainer directly.

``backend.slurm.cluster = "local"`` runs the same jobs through submitit's local executor (no
cluster; used by the tests), "debug" in this process.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Sequence

from dali_jax.study import jobs as J
from dali_jax.study.spec import BackendError

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED", "FINISHED", "INTERRUPTED")

try:  # a missing submitit only matters to the slurm backend
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover
    _Checkpointable = object


class JobCallable(_Checkpointable):
    """A study job as a submitit callable; ``checkpoint`` stops the child and requeues."""

    def __init__(self, job: J.Job):
        self.job = job
        self._proc = None

    def __call__(self) -> dict:
        rec = J.execute(self.job, on_start=self._started)
        if rec["outcome"] not in ("done", "skipped"):
            raise RuntimeError(f"{self.job.kind} {self.job.name}: {rec['outcome']}: "
                               f"{rec.get('error', '')} (log: {self.job.log})")
        return rec

    def _started(self, proc) -> None:
        self._proc = proc

    def checkpoint(self, *args, **kwargs):
        """Called by submitit before requeueing: the child saves and exits, then a fresh
        callable of the same job is resubmitted."""
        import submitit
        if self._proc is not None:
            J.stop_process(self._proc, grace_s=60.0)
        return submitit.helpers.DelayedSubmission(JobCallable(self.job))

    def __getstate__(self):
        return {"job": self.job, "_proc": None}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise BackendError("the slurm backend needs submitit: pip install 'submitit>=1.5,<2'") \
            from None
    return submitit


def executor_parameters(study, kind: str) -> dict:
    """submitit AutoExecutor parameters of ``kind`` jobs ("train" | "eval" | "reference")."""
    s = study.backend.slurm
    params = dict(name=f"{study.name}-{kind}",
                  timeout_min=int(s.time_min if kind == "train" else s.eval_time_min),
                  gpus_per_node=int(s.gpus_per_node), cpus_per_task=int(s.cpus_per_task),
                  nodes=1, tasks_per_node=1, stderr_to_stdout=True,
                  slurm_array_parallelism=int(s.array_parallelism))
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if s.partition:
        params["slurm_partition"] = s.partition
    if len(s.extra):
        params["slurm_additional_parameters"] = {k: s.extra[k] for k in s.extra.keys()}
    if s.setup:
        params["slurm_setup"] = list(s.setup)
    return params


def make_executor(study, folder: str, kind: str):
    """A submitit executor for ``kind`` jobs, writing its files under ``folder``."""
    submitit = _submitit()
    cluster = study.backend.slurm.cluster
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise BackendError("backend slurm: sbatch not found on PATH (not on a SLURM login "
                           "node?); use --backend local, or backend.slurm.cluster = 'local'")
    ex = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    ex.update_parameters(**executor_parameters(study, kind))
    return ex


def submit(study, jobs: Sequence[J.Job], folder: str, kind: str) -> list:
    """Submits ``jobs`` as one array (on SLURM) and records ``<state_dir>/queued.json`` per
    job; returns the submitit jobs."""
    if not jobs:
        return []
    ex = make_executor(study, folder, kind)
    sjobs = ex.submit_array([JobCallable(j) for j in jobs])
    now = time.time()
    for job, sj in zip(jobs, sjobs):
        os.makedirs(job.state_dir, exist_ok=True)
        record = {"kind": job.kind, "name": job.name, "job_id": str(sj.job_id),
                  "cluster": study.backend.slurm.cluster, "folder": folder, "time": now}
        tmp = os.path.join(job.state_dir, "queued.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, os.path.join(job.state_dir, "queued.json"))
    return sjobs


def job_state(record: dict) -> str | None:
    """"queued" (pending or running), "gone" (ended) or None (unknown) for a queued.json
    record, asking SLURM (sacct) or, for submitit's local executor, the process table."""
    cluster, job_id = record.get("cluster"), str(record.get("job_id", ""))
    if cluster == "local":
        try:
            os.kill(int(job_id), 0)
            return "queued"
        except (ValueError, ProcessLookupError):
            return "gone"
        except PermissionError:
            return "queued"
    if cluster != "slurm" or shutil.which("sacct") is None:
        return None
    try:
        submitit = _submitit()
        state = submitit.SlurmJob(folder=os.path.join(record["folder"], "%j"),
                                  job_id=job_id).state
    except Exception:  # noqa: BLE001 - no answer is "unknown"
        return None
    if state == "UNKNOWN":
        return None
    return "gone" if state.split()[0] in TERMINAL else "queued"


def wait(sjobs: Sequence, desc: str, quiet: bool = False, poll_s: float = 5.0) -> list:
    """Blocks until every submitit job has ended; -> per job None (success) or the error."""
    from tqdm import tqdm
    remaining = dict(enumerate(sjobs))
    errors: list = [None] * len(sjobs)
    with tqdm(total=len(sjobs), desc=desc, unit="job", disable=quiet or not sjobs) as bar:
        while remaining:
            for i, sj in list(remaining.items()):
                if sj.done():
                    del remaining[i]
                    errors[i] = _job_error(sj)
                    bar.update(1)
                    if errors[i]:
                        bar.write(f"FAILED job {sj.job_id}: {errors[i]}")
            if remaining:
                time.sleep(poll_s)
    return errors


def _job_error(sj) -> str | None:
    try:
        sj.result()
        return None
    except Exception as e:  # noqa: BLE001 - submitit wraps the job's exception
        text = str(e).strip().splitlines()
        return text[-1] if text else type(e).__name__

"""The jobs of each stage (train, evaluate) and their launch on the study's backend."""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from dali_jax.study import jobs as J
from dali_jax.study import plan as P


# ----------------------------------------------------------------------------- train
def train_job(study, run: P.Run, config) -> J.Job:
    """The job that trains ``run`` to ``config.run.steps`` (resuming from its checkpoint)."""
    return J.Job("train", run.name, P.train_command(study, run), run.state_dir,
                 os.path.join(run.logdir, "train.log"),
                 ("train", run.logdir, int(config.run.steps)))


def train_jobs(study, runs: Sequence[P.Run], configs: dict) -> list[J.Job]:
    """Train jobs of the runs that are not finished."""
    jobs = [train_job(study, r, configs[r.name]) for r in runs]
    return [j for j in jobs if not J.is_complete(j)]


# ----------------------------------------------------------------------------- evaluate
def eval_indices(study, setting: str) -> list[int]:
    """Grid indices evaluated for runs of ``setting`` (all 84, or those the setting scores)."""
    from dali_jax.envs import contexts as C
    grid = C.evaluation_grid(study.task)
    if study.evaluation.contexts == "all":
        return [g.index for g in grid]
    return [g.index for g in grid if C.regime(study.task, setting, g.values) is not None]


def episode_length(configs: dict) -> int:
    lengths = {int(c.run.episode_length) for c in configs.values()}
    if len(lengths) != 1:
        raise ValueError(f"the runs have different run.episode_length values {sorted(lengths)}")
    return lengths.pop()


def reference_path(study, root: str, length: int) -> str:
    """DIR/references/random_<task>_L<episode length>.json (one per task and length)."""
    return os.path.join(os.path.abspath(root), "references",
                        f"random_{study.task}_L{length}.json")


def reference_job(study, root: str, configs: dict) -> J.Job:
    """The job that computes the random-policy reference on every context any run evaluates."""
    length = episode_length(configs)
    path = reference_path(study, root, length)
    indices = sorted({i for s in study.settings for i in eval_indices(study, s)})
    e = study.evaluation
    argv = (sys.executable, "-u", "-m", "dali_jax.evaluate", "--random", "--task", study.task,
            "--out", path, "--episodes", str(e.random_episodes), "--seeds", str(e.random_seeds),
            "--num-envs", str(e.num_envs), "--contexts", ",".join(map(str, indices)),
            "--episode-length", str(length))
    refdir = os.path.dirname(path)
    return J.Job("reference", os.path.basename(path), argv, os.path.join(refdir, "study"),
                 os.path.join(refdir, f"random_{study.task}_L{length}.log"),
                 ("reference", path, study.task, tuple(indices)))


def eval_job(study, run: P.Run) -> J.Job:
    """The job that evaluates ``run``'s final checkpoint on the grid (eval/returns.json)."""
    e = study.evaluation
    contexts = "all" if e.contexts == "all" else "scored"
    argv = (sys.executable, "-u", "-m", "dali_jax.evaluate", "--logdir", run.logdir,
            "--episodes", str(e.episodes), "--contexts", contexts, "--num-envs",
            str(e.num_envs), "--mode", e.mode)
    return J.Job("eval", run.name, argv, run.state_dir, os.path.join(run.logdir, "eval.log"),
                 ("eval", run.logdir, int(e.episodes), tuple(eval_indices(study, run.setting))))


def evaluation_jobs(study, root: str, runs: Sequence[P.Run], configs: dict,
                    force: bool = False) -> tuple[list[J.Job], list[str], list[str]]:
    """(jobs to launch, names of runs already evaluated, names of runs not finished).

    The reference job comes first when the cached reference lacks a context; runs already
    evaluated at their final checkpoint are skipped unless ``force``.
    """
    jobs, skipped, unfinished = [], [], []
    ref = reference_job(study, root, configs)
    if not J.is_complete(ref):
        jobs.append(ref)
    for run in runs:
        if not J.is_complete(train_job(study, run, configs[run.name])):
            unfinished.append(run.name)
            continue
        job = eval_job(study, run)
        if force:
            job = J.Job(job.kind, job.name, job.argv, job.state_dir, job.log,
                        job.check + (time.time(),))
        if J.is_complete(job):
            skipped.append(run.name)
        else:
            jobs.append(job)
    return jobs, skipped, unfinished


# ----------------------------------------------------------------------------- launch
def launch(study, root: str, jobs: Sequence[J.Job], kind: str, wait: bool = True,
           concurrency: int = 0, quiet: bool = False) -> tuple[list[str], list]:
    """Runs ``jobs`` on the study's backend. -> (lines describing failures, submitit jobs
    still pending when not waiting)."""
    if not jobs:
        return [], []
    if study.backend.name == "local":
        from dali_jax.study import local
        recs = local.run_jobs(jobs, concurrency or study.backend.local.concurrency,
                              desc=kind, quiet=quiet)
        return [f"{j.kind} {j.name}: {r.get('outcome')}: {r.get('error', '')} (log: {j.log})"
                for j, r in zip(jobs, recs) if r and r["outcome"] in ("failed",)], []
    from dali_jax.study import slurm
    folder = os.path.join(os.path.abspath(root), "submitit")
    groups: dict[str, list] = {}
    for j in jobs:  # train and evaluation jobs need different time limits
        groups.setdefault("train" if j.kind == "train" else "eval", []).append(j)
    sjobs = []
    for k, js in groups.items():
        submitted = slurm.submit(study, js, folder, k)
        if not quiet:
            ids = sorted({str(s.job_id).split("_")[0] for s in submitted})
            print(f"submitted {len(js)} {k} job(s) to {study.backend.slurm.cluster}: "
                  f"{', '.join(ids)} (files in {folder})")
        sjobs += list(zip(js, submitted))
    if not wait:
        return [], [s for _, s in sjobs]
    errors = slurm.wait([s for _, s in sjobs], desc=kind, quiet=quiet)
    return [f"{j.kind} {j.name}: {e} (log: {j.log})" for (j, _), e in zip(sjobs, errors) if e], []

"""The runs of a study, their configs and work, and the jobs that train and evaluate them.
A study directory DIR holds ``runs/<method>/<setting>/s<seed>/`` (one logdir per run),
``references/`` (random-policy references), ``report/`` and ``submitit/`` (slurm backend).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import sys

from dali_jax import config as config_lib
from dali_jax import overrides
from dali_jax import presets
from dali_jax.envs import contexts as C
from dali_jax.study import rundir as RD
from dali_jax.study.jobs import Job
from dali_jax.study.spec import StudyError


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: name "<method>/<setting>/s<seed>", logdir DIR/runs/<name> (absolute),
    argv: the experiment file's arguments (``--preset=P --config.FIELD=VALUE ...``)."""

    method: str
    setting: str
    seed: int
    name: str
    logdir: str
    argv: tuple


def _argv(study, method: str, setting: str, seed: int, logdir: str, own_only=False) -> tuple:
    """Preset, the run's own fields, then (unless ``own_only``) the study's overrides and the
    method's own overrides."""
    args = [f"--preset={study.preset}", f"--config.obs={study.obs}",
            f"--config.method={study.variants.get(method, method)}",
            f"--config.context_setting={setting}", f"--config.seed={seed}",
            f"--config.logdir={logdir}"]
    if not own_only:
        over = dict(study.overrides.items()) | dict(study.method_overrides.get(method, {}))
        spell = lambda v: str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(
            v, float) else str(v)  # as a --config.FIELD=VALUE flag parses it
        args += [f"--config.{k}={spell(v)}" for k, v in over.items()]
    return tuple(args)


def plan_runs(study, root: str) -> list[Run]:
    """Every run under study directory ``root``, ordered seed first (so a partial study holds
    every method and setting of its first seeds), then setting, then method."""
    runs = []
    for seed, setting, method in itertools.product(study.seeds, study.settings, study.methods):
        logdir = os.path.join(os.path.abspath(root), "runs", method, setting, f"s{seed}")
        runs.append(Run(method, setting, int(seed), f"{method}/{setting}/s{seed}", logdir,
                        _argv(study, method, setting, seed, logdir)))
    return runs


def _config(study, argv):
    return overrides.parse(functools.partial(presets.experiment_config, study.task),
                           list(argv), presets.NAMES)


def run_configs(study, runs) -> dict:
    """{run name: validated ConfigDict}, built as the experiment files build it. A bad
    override raises StudyError naming ``study.overrides[...]``, as do runs of different
    episode lengths (one random-policy reference serves every run)."""
    out = {}
    for run in runs:
        try:
            out[run.name] = _config(study, run.argv)
        except ValueError as e:
            where = ("study.overrides" if run.method not in study.method_overrides else
                     f"study.overrides or study.method_overrides[{run.method!r}]")
            raise StudyError(f"{where}: {e}") from None
    lengths = sorted({int(c.run.episode_length) for c in out.values()})
    if len(lengths) > 1:
        raise StudyError(f"study.overrides and study.method_overrides give the runs "
                         f"run.episode_length values {lengths}; the random-policy reference "
                         f"needs one")
    return out


def config_json(config) -> dict:
    """A config as the JSON the trainer writes to ``config.json`` (logdir dropped)."""
    d = json.loads(config.to_json_best_effort())
    d.pop("logdir", None)
    return d


def config_conflict(study, run: Run, config) -> str | None:
    """Fields where ``run``'s config.json differs from the planned ``config``, as one line;
    None when it matches or the run has not started. A field config.json lacks (an option
    added to dali_jax after the run started) is no conflict while the plan keeps its default
    (the value without the study's overrides)."""
    path = os.path.join(run.logdir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path} is unreadable ({e})"
    old.pop("logdir", None)
    base = _config(study, _argv(study, run.method, run.setting, run.seed, run.logdir, True))
    old = config_lib.with_defaults(old, config_json(base))
    return config_lib.differences(old, config_json(config), ("run", "study")) or None


def eval_indices(study, setting: str) -> list[int]:
    """Grid indices evaluated for runs of ``setting`` (all 84, or those the setting scores)."""
    grid = C.evaluation_grid(study.task)
    return [g.index for g in grid if study.evaluation.contexts == "all"
            or C.regime(study.task, setting, g.values) is not None]


def work(study, run: Run, config) -> tuple[int, int, int]:
    """(env steps, updates, evaluation env steps) of ``run``."""
    steps = int(config.run.steps)
    updates = int(max(0, steps - config.run.prefill) * config.run.train_ratio
                  / (config.train.batch_size * config.train.batch_length))
    episodes = len(eval_indices(study, run.setting)) * study.evaluation.episodes
    return steps, updates, episodes * int(config.run.episode_length)


# ----------------------------------------------------------------------------- jobs
def train_job(study, run: Run, config) -> Job:
    """Trains ``run`` to ``config.run.steps`` (resuming from its checkpoint)."""
    argv = (sys.executable, "-u", "-m", "dali_jax.launch", "--task", study.task) + run.argv
    done = functools.partial(RD.training_finished, run.logdir, int(config.run.steps))
    return Job("train", run.name, argv, os.path.join(run.logdir, "train.log"),
               os.path.join(run.logdir, RD.LOCK), done)


def eval_job(study, run: Run) -> Job:
    """Evaluates ``run``'s final checkpoint on the grid (eval/returns.json)."""
    e = study.evaluation
    argv = (sys.executable, "-u", "-m", "dali_jax.evaluate", "--logdir", run.logdir,
            "--episodes", str(e.episodes), "--contexts", e.contexts, "--num-envs",
            str(e.num_envs), "--mode", e.mode)
    done = functools.partial(RD.evaluated, run.logdir, int(e.episodes),
                             tuple(eval_indices(study, run.setting)))
    return Job("eval", run.name, argv, os.path.join(run.logdir, "eval.log"),
               os.path.join(run.logdir, RD.LOCK), done)


def episode_length(configs: dict) -> int:
    """The runs' run.episode_length (one for all: ``run_configs`` checks it)."""
    return int(next(iter(configs.values())).run.episode_length)


def reference_path(study, root: str, configs: dict) -> str:
    """DIR/references/random_<task>_L<episode length>.json (one per task and length)."""
    return os.path.join(os.path.abspath(root), "references",
                        f"random_{study.task}_L{episode_length(configs)}.json")


def reference_job(study, root: str, configs: dict) -> Job:
    """Computes the random-policy reference on every context any run evaluates."""
    path = reference_path(study, root, configs)
    indices = sorted({i for s in study.settings for i in eval_indices(study, s)})
    e = study.evaluation
    argv = (sys.executable, "-u", "-m", "dali_jax.evaluate", "--random", "--task", study.task,
            "--out", path, "--episodes", str(e.random_episodes), "--seeds", str(e.random_seeds),
            "--num-envs", str(e.num_envs), "--contexts", ",".join(map(str, indices)),
            "--episode-length", str(episode_length(configs)))
    stem = path[:-len(".json")]
    return Job("reference", os.path.basename(path), argv, stem + ".log", stem + ".lock",
               functools.partial(reference_complete, path, study.task, tuple(indices)))


def reference_complete(path: str, task: str, indices) -> bool:
    """The random-policy reference file ``path`` holds the grid contexts ``indices``."""
    from dali_jax.analysis.normalize import ReferenceFileError, load_reference
    try:
        ref = load_reference(path, kind="random", task=task)
    except (ReferenceFileError, KeyError):
        return False
    return all(C.evaluation_grid(task)[i].values in ref for i in indices)


def evaluation_jobs(study, root: str, runs, configs: dict):
    """-> (jobs to launch, names of runs already evaluated, names of runs not finished); the
    reference job first when the reference lacks a context."""
    ref = reference_job(study, root, configs)
    jobs, skipped, unfinished = [] if ref.done() else [ref], [], []
    for run in runs:
        job = eval_job(study, run)
        if not train_job(study, run, configs[run.name]).done():
            unfinished.append(run.name)
        elif job.done():
            skipped.append(run.name)
        else:
            jobs.append(job)
    return jobs, skipped, unfinished

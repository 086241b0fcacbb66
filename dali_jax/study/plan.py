"""The runs of a study: names, logdirs, experiment-file arguments, configs and estimated cost.

Layout of a study directory DIR::

    DIR/runs/<method>/<setting>/s<seed>/   one training logdir per run (the trainer's files,
                                           plus train.log, eval.log and study/ records)
    DIR/references/                        random-policy references, one file per task
    DIR/report/                            the aggregate report (index.md)
    DIR/submitit/                          submitit's job files (slurm backend)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Sequence

from dali_jax import config as config_lib
from dali_jax import overrides
from dali_jax import presets
from dali_jax.study.rundir import first_and_last_record
from dali_jax.study.spec import StudyError, base_method



@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study.

    name: "<method>/<setting>/s<seed>"; logdir: absolute DIR/runs/<name>;
    argv: experiment-file arguments (``--preset P --config.FIELD=VALUE ...``).
    """

    method: str
    setting: str
    seed: int
    name: str
    logdir: str
    argv: tuple

    @property
    def state_dir(self) -> str:
        """Folder of the study runner's records of this run (lock, attempts)."""
        return os.path.join(self.logdir, "study")


def format_value(value) -> str:
    """An override value as `overrides.apply_overrides` parses it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _own_argv(study, method: str, setting: str, seed: int, logdir: str) -> tuple:
    """The preset and the run's own fields, without any override."""
    return (f"--preset={study.preset}", f"--config.obs={study.obs}",
            f"--config.method={base_method(study, method)}",
            f"--config.context_setting={setting}",
            f"--config.seed={seed}", f"--config.logdir={logdir}")


def run_argv(study, method: str, setting: str, seed: int, logdir: str) -> tuple:
    """Experiment-file arguments of one run: preset, the run's fields, the overrides, then the
    method's own overrides."""
    args = list(_own_argv(study, method, setting, seed, logdir))
    args += [f"--config.{k}={format_value(v)}" for k, v in study.overrides.items()]
    if method in study.method_overrides:
        args += [f"--config.{k}={format_value(v)}"
                 for k, v in study.method_overrides[method].items()]
    return tuple(args)


def plan_runs(study, root: str) -> list[Run]:
    """Every run of ``study`` under study directory ``root``, ordered seed first (so a partial
    study holds every method and setting of its first seeds), then setting, then method."""
    root = os.path.abspath(root)
    runs = []
    for seed in study.seeds:
        for setting in study.settings:
            for method in study.methods:
                name = f"{method}/{setting}/s{seed}"
                logdir = os.path.join(root, "runs", method, setting, f"s{seed}")
                runs.append(Run(method, setting, int(seed), name, logdir,
                                run_argv(study, method, setting, seed, logdir)))
    return runs


def run_configs(study, runs: Sequence[Run]) -> dict:
    """{run name: validated ConfigDict}, built as the experiment files build it
    (`presets.experiment_config`).
    A bad override raises StudyError naming ``study.overrides[...]``."""
    get_config = functools.partial(presets.experiment_config, study.task)
    out = {}
    for run in runs:
        try:
            out[run.name] = overrides.parse(get_config, list(run.argv), presets.NAMES)
        except ValueError as e:
            where = ("study.overrides" if run.method not in study.method_overrides else
                     f"study.overrides or study.method_overrides[{run.method!r}]")
            raise StudyError(f"{where}: {e}") from None
    return out


def train_command(study, run: Run) -> tuple:
    """The command that trains (or resumes) ``run``."""
    return (sys.executable, "-u", "-m", "dali_jax.launch", "--task", study.task) + tuple(run.argv)


def config_json(config) -> dict:
    """A config as the JSON the trainer writes to ``config.json`` (logdir dropped)."""
    d = json.loads(config.to_json_best_effort())
    d.pop("logdir", None)
    return d


def config_conflict(run: Run, config, base=None) -> str | None:
    """Fields where ``run``'s existing config.json differs from the planned ``config``, as one
    line; None when it matches or the run has not started.

    ``base``: the run's config without the study's overrides (``base_config``). A field the
    run's config.json lacks (added to dali_jax after the run started) is no conflict when the
    plan keeps ``base``'s value for it: new options default to the old behaviour."""
    path = os.path.join(run.logdir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        return f"{path} is unreadable ({e})"
    old.pop("logdir", None)
    if base is not None:
        old = config_lib.with_defaults(old, config_json(base))
    diffs = _diff(_flatten(old), _flatten(config_json(config)))
    if not diffs:
        return None
    return "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} fields)" if len(diffs) > 8 else "")


def base_config(study, run: Run):
    """``run``'s config built from the preset and the run's own fields only (no overrides)."""
    argv = _own_argv(study, run.method, run.setting, run.seed, run.logdir)
    return overrides.parse(functools.partial(presets.experiment_config, study.task), list(argv),
                           presets.NAMES)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: run has {old.get(k, '<absent>')!r}, study has {new.get(k, '<absent>')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ----------------------------------------------------------------------------- cost
@dataclasses.dataclass
class Cost:
    """Estimated work of one run: env steps, updates, evaluation env steps, seconds (None when
    the rate is unknown) and where the rate came from ("study file", "measured", "unknown")."""

    env_steps: int
    updates: int
    eval_steps: int
    train_s: float | None
    eval_s: float | None
    source: str

    @property
    def total_s(self) -> float | None:
        if self.train_s is None:
            return None
        return self.train_s + (self.eval_s or 0.0)


def eval_context_count(study, setting: str) -> int:
    """Grid contexts evaluated per run of ``setting``."""
    from dali_jax.envs import contexts as C
    grid = C.evaluation_grid(study.task)
    if study.evaluation.contexts == "all":
        return len(grid)
    return sum(C.regime(study.task, setting, g.values) is not None for g in grid)


def estimate(study, run: Run, config, measured: dict | None = None) -> Cost:
    """Cost of ``run`` from its config; ``measured`` maps method -> env steps/s seen in DIR."""
    steps = int(config.run.steps)
    per_update = config.train.batch_size * config.train.batch_length
    updates = int(max(0, steps - config.run.prefill) * config.run.train_ratio / per_update)
    eval_steps = (eval_context_count(study, run.setting) * study.evaluation.episodes
                  * int(config.run.episode_length))
    rate, source = (measured or {}).get(run.method), "measured"
    if not rate:
        rate, source = study.cost.train_steps_per_s, "study file"
    if not rate:
        source = "unknown"
    eval_rate = study.cost.eval_steps_per_s
    return Cost(steps, updates, eval_steps, steps / rate if rate else None,
                eval_steps / eval_rate if eval_rate else None, source)


def measured_rate(logdir: str) -> float | None:
    """Env steps per second of a run from the first and last record of its metrics.jsonl
    (None with fewer than 1000 steps between them)."""
    first, last = first_and_last_record(os.path.join(logdir, "metrics.jsonl"))
    if not first or not last:
        return None
    dt, ds = last["time"] - first["time"], last["step"] - first["step"]
    return ds / dt if dt > 0 and ds >= 1000 else None

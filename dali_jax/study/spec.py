"""Study files: the fields of a zero-shot study, their defaults, loading and validation.

A study file is a Python file whose ``get_config()`` returns an ml_collections ConfigDict. Start
from ``defaults()`` and set what differs; fields left out keep their defaults, unknown fields
are errors::

    from dali_jax.study import spec

    def get_config():
        c = spec.defaults()
        c.task = "ball_in_cup"
        c.methods = ("dreamer_dr", "dali_d")
        c.seeds = (0, 1, 2)
        c.settings = ("single_0",)
        c.preset = "cpu"
        c.overrides["run.steps"] = 50_000
        return c

``load(path)`` returns the validated ConfigDict (with ``name`` filled in); every error is a
``StudyError`` naming the field (``study.<field>``) and the valid values.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from typing import Mapping

import ml_collections

from dali_jax import config as config_lib
from dali_jax import presets
from dali_jax.envs import contexts as C
from dali_jax.methods import METHODS

# The folder holding this dali_jax package (a checkout, or site-packages): the study's jobs
# run there, so `python -m dali_jax...` runs this same package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASE_SEEDS = (0, 42, 1337, 13, 71, 1994, 1997, 908, 2102, 3)  # docs/protocol.md
BACKENDS = ("local", "slurm")
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")
EVAL_CONTEXTS = ("all", "scored")
# Config fields the study sets per run; an override of them is an error.
RUN_FIELDS = ("task", "obs", "method", "seed", "context_setting", "logdir")
# Fields holding free-form mappings (their keys are not checked against the defaults).
_FREE = ("overrides", "variants", "backend.slurm.extra")
_NESTED_FREE = ("method_overrides",)  # method -> {dotted config path: value}


class StudyError(ValueError):
    """A bad study file; the message names the field and the valid values."""


class BackendError(StudyError):
    """The study's backend cannot run on this machine (e.g. slurm without sbatch)."""


def defaults() -> ml_collections.ConfigDict:
    """Every field of a study with its default (the paper's Ball-in-Cup featurized study)."""
    c = ml_collections.ConfigDict()
    c.name = ""  # study name; empty: the study file's name
    c.task = "ball_in_cup"  # ball_in_cup | walker
    c.obs = "features"  # features | pixels
    c.methods = METHODS  # any of dali_jax.methods.METHODS, or a label of `variants`
    # Label -> method: a second entry of one method under its own name (run directory,
    # report row), set apart by its method_overrides, e.g. c.variants["dali_d_paper"] =
    # "dali_d" with c.method_overrides["dali_d_paper"] = {"context.alignment": "paper"}.
    c.variants = ml_collections.ConfigDict()
    c.seeds = RELEASE_SEEDS  # non-empty, distinct, >= 0
    c.settings = ("single_0", "single_1", "double_box")  # training context settings
    c.preset = "paper"  # run preset of the experiment file: paper | cpu | first | quick | smoke
    # Dotted config path -> value, applied to every run after the preset, e.g.
    # c.overrides["run.steps"] = 50_000. The study's own fields (task, obs, method, seed,
    # context_setting, logdir) cannot be overridden.
    c.overrides = ml_collections.ConfigDict(allow_dotted_keys=True)
    # Method -> {dotted config path: value}, applied after `overrides` to that method's runs
    # only, e.g. c.method_overrides["dali_d"] = {"context.loss": "inverse"}: a per-method
    # hyperparameter that other methods' configs (and their resumability) do not see.
    c.method_overrides = ml_collections.ConfigDict(convert_dict=False)

    e = c.evaluation = ml_collections.ConfigDict()
    e.episodes = 50  # episodes per grid context (protocol: 50)
    e.contexts = "all"  # all (the 84-context grid) | scored (those the run's setting scores)
    e.mode = "sample"  # sample (as the release) | mode (deterministic actions)
    e.num_envs = 16  # envs stepped together
    e.random_episodes = 10  # random-policy reference: episodes per context and seed
    e.random_seeds = 5  # random-policy reference: seeds (the reference is the max)
    e.expert_reference = ""  # expert reference file; needed for walker scores

    r = c.report = ml_collections.ConfigDict()
    r.reps = 50_000  # bootstrap replicates (the release uses 100)
    r.seed = 0  # bootstrap seed
    r.confidence = 0.95  # CI coverage

    k = c.cost = ml_collections.ConfigDict()
    # Throughput of one run on its slot (a GPU, or 2 cores) for `plan`'s estimate; 0: unknown.
    # Runs in DIR that have logged progress replace these with measured figures.
    k.train_steps_per_s = 0.0  # env steps per second while training
    k.eval_steps_per_s = 0.0  # env steps per second while evaluating

    b = c.backend = ml_collections.ConfigDict()
    b.name = "local"  # local | slurm
    b.local = ml_collections.ConfigDict()
    b.local.concurrency = 0  # runs at once; 0: one per GPU, else one per 2 CPU cores
    s = b.slurm = ml_collections.ConfigDict()
    s.cluster = "slurm"  # slurm | local (submitit's local executor) | debug (in-process)
    s.partition = ""  # empty: the cluster's default partition
    s.time_min = 24 * 60  # wall-clock limit of one training job; longer runs requeue
    s.eval_time_min = 4 * 60  # wall-clock limit of one evaluation job
    s.gpus_per_node = 1
    s.cpus_per_task = 8
    s.mem_gb = 32  # 0: the cluster's default
    s.array_parallelism = 64  # array tasks running at once
    s.extra = ml_collections.ConfigDict()  # more sbatch options, e.g. extra.account = "abc"
    s.setup = ()  # shell lines run before each job, e.g. ("source .venv/bin/activate",)
    return c


# ----------------------------------------------------------------------------- loading
def load(path: str) -> ml_collections.ConfigDict:
    """Study file -> validated study ConfigDict (``name`` defaults to the file's stem)."""
    if not os.path.isfile(path):
        raise StudyError(f"study file {path} not found")
    spec = importlib.util.spec_from_file_location(
        f"_dali_study_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error of the user's file
        raise StudyError(f"study file {path} failed to load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise StudyError(f"study file {path} must define get_config() returning a ConfigDict")
    user = module.get_config()
    if not isinstance(user, (ml_collections.ConfigDict, Mapping)):
        raise StudyError(f"get_config() of {path} must return a ConfigDict; "
                         f"got {type(user).__name__}")
    study = merge(user)
    if not study.name:
        study.name = os.path.splitext(os.path.basename(path))[0]
    validate(study)
    return study


def merge(user) -> ml_collections.ConfigDict:
    """Defaults updated with the fields of ``user`` (a ConfigDict or mapping); an unknown
    field raises StudyError naming it and the valid fields."""
    out = defaults()
    _merge_into(out, user, "")
    return out


def _merge_into(base, user, prefix: str) -> None:
    for key in user.keys():
        path = f"{prefix}{key}"
        value = user[key]
        if key not in base:
            hint = difflib.get_close_matches(key, list(base.keys()), n=1)
            raise StudyError(
                f"study.{path}: unknown field" + (f" (did you mean {prefix}{hint[0]}?)" if hint
                                                  else "")
                + f"; valid fields{' of study.' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(sorted(base.keys()))}")
        if path in _NESTED_FREE:
            if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
                raise StudyError(f"study.{path} must be a mapping of method -> mapping; "
                                 f"got {type(value).__name__}")
            for k in value.keys():
                inner = value[k]
                if not isinstance(inner, (ml_collections.ConfigDict, Mapping)):
                    raise StudyError(f"study.{path}[{k!r}] must be a mapping of config path -> "
                                     f"value; got {type(inner).__name__}")
                base[key][k] = {kk: _plain(inner[kk]) for kk in inner.keys()}
        elif path in _FREE:
            if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
                raise StudyError(f"study.{path} must be a mapping; got {type(value).__name__}")
            for k in value.keys():
                base[key][k] = _plain(value[k])
        elif isinstance(base[key], ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, Mapping)):
                raise StudyError(f"study.{path} is a group of fields "
                                 f"({', '.join(sorted(base[key].keys()))}); "
                                 f"got {type(value).__name__}")
            _merge_into(base[key], value, path + ".")
        else:
            try:
                base[key] = _plain(value)
            except TypeError as e:
                raise StudyError(f"study.{path}: {e}") from None


def _plain(value):
    if isinstance(value, list):
        return tuple(value)
    return value


# ----------------------------------------------------------------------------- validation
def _fail(field: str, msg: str):
    raise StudyError(f"study.{field} {msg}")


def _choice(field: str, value, options) -> None:
    if value not in options:
        _fail(field, f"must be one of {', '.join(map(str, options))}; got {value!r}")


def _int(field: str, value, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        _fail(field, f"must be an integer >= {minimum}; got {value!r}")


def _number(field: str, value, minimum: float = 0.0) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum):
        _fail(field, f"must be a number >= {minimum:g}; got {value!r}")


def _sequence(field: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        _fail(field, f"must be a list; got {value!r}")
    if not value:
        _fail(field, "must not be empty")
    dup = sorted({str(v) for v in value if list(value).count(v) > 1})
    if dup:
        _fail(field, f"lists {', '.join(dup)} more than once")
    return tuple(value)


def base_method(study, label: str) -> str:
    """The method a study's method entry runs (a `variants` label's method, else itself)."""
    return study.variants.get(label, label)


def setting_choices(task: str) -> dict[str, str]:
    """Context settings of ``task`` -> what they vary (for error messages and docs)."""
    f0, f1 = C.FACTORS[task]
    return {"default": "the default context only", "single_0": f"{f0} varied",
            "single_1": f"{f1} varied", "double_box": f"{f0} and {f1} varied",
            "specific": "one fixed context (config.specific_context)"}


def validate(s) -> None:
    """Checks every field of a merged study; raises StudyError naming field and valid values."""
    _choice("task", s.task, C.TASKS)
    _choice("obs", s.obs, config_lib.OBS_MODES)
    for label, method in s.variants.items():
        if label in METHODS or not re.fullmatch(r"[a-z][a-z0-9_]*", label):
            _fail(f"variants[{label!r}]", "must be a new name of lower-case letters, digits "
                                         "and underscores, not one of the methods")
        if method not in METHODS:
            _fail(f"variants[{label!r}]", f"must name a method; got {method!r}; valid "
                                         f"methods: {', '.join(METHODS)}")
    for m in _sequence("methods", s.methods):
        if m not in METHODS and m not in s.variants:
            _fail("methods", f"lists unknown method {m!r}; valid methods: {', '.join(METHODS)}"
                             " (or a label of study.variants)")
    for seed in _sequence("seeds", s.seeds):
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            _fail("seeds", f"must hold integers >= 0; got {seed!r}")
    choices = setting_choices(s.task)
    for name in _sequence("settings", s.settings):
        if name not in choices:
            valid = "; ".join(f"{k} ({v})" for k, v in choices.items())
            _fail("settings", f"lists {name!r}, which is not a context setting of {s.task}; "
                              f"valid settings: {valid}")
    _choice("preset", s.preset, presets.NAMES)
    for key in s.overrides.keys():
        if key in RUN_FIELDS:
            _fail(f"overrides[{key!r}]", f"is set by the study (one of {', '.join(RUN_FIELDS)}); "
                                         f"use the study's own fields instead")
    for method in s.method_overrides.keys():
        if method not in s.methods:
            _fail(f"method_overrides[{method!r}]", f"names a method the study does not run; "
                                                    f"its methods: {', '.join(s.methods)}")
        for key in s.method_overrides[method].keys():
            if key in RUN_FIELDS:
                _fail(f"method_overrides[{method!r}][{key!r}]",
                      f"is set by the study (one of {', '.join(RUN_FIELDS)}); "
                      f"use the study's own fields instead")
    e = s.evaluation
    _int("evaluation.episodes", e.episodes, 1)
    _choice("evaluation.contexts", e.contexts, EVAL_CONTEXTS)
    if e.contexts == "scored":
        unscored = [x for x in s.settings if x not in C.SCORED_SETTINGS]
        if unscored:
            _fail("evaluation.contexts", f"is 'scored', but setting(s) {', '.join(unscored)} "
                                         f"score no grid context; use 'all'")
    _choice("evaluation.mode", e.mode, ("sample", "mode"))
    for f in ("num_envs", "random_episodes", "random_seeds"):
        _int(f"evaluation.{f}", e[f], 1)
    if not isinstance(e.expert_reference, str):
        _fail("evaluation.expert_reference", f"must be a file path or ''; got "
                                             f"{e.expert_reference!r}")
    _int("report.reps", s.report.reps, 1)
    _int("report.seed", s.report.seed, 0)
    if not (isinstance(s.report.confidence, float) and 0 < s.report.confidence < 1):
        _fail("report.confidence", f"must lie in (0, 1); got {s.report.confidence!r}")
    _number("cost.train_steps_per_s", s.cost.train_steps_per_s)
    _number("cost.eval_steps_per_s", s.cost.eval_steps_per_s)
    _validate_backend(s.backend)


def _validate_backend(b) -> None:
    _choice("backend.name", b.name, BACKENDS)
    _int("backend.local.concurrency", b.local.concurrency, 0)
    sl = b.slurm
    _choice("backend.slurm.cluster", sl.cluster, SUBMITIT_CLUSTERS)
    if not isinstance(sl.partition, str):
        _fail("backend.slurm.partition", f"must be a partition name or ''; got {sl.partition!r}")
    _int("backend.slurm.time_min", sl.time_min, 1)
    _int("backend.slurm.eval_time_min", sl.eval_time_min, 1)
    _int("backend.slurm.gpus_per_node", sl.gpus_per_node, 0)
    _int("backend.slurm.cpus_per_task", sl.cpus_per_task, 1)
    _number("backend.slurm.mem_gb", sl.mem_gb)
    _int("backend.slurm.array_parallelism", sl.array_parallelism, 1)
    if isinstance(sl.setup, str) or not all(isinstance(x, str) for x in sl.setup):
        _fail("backend.slurm.setup", f"must be a list of shell lines; got {sl.setup!r}")

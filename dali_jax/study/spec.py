"""Study files: the fields of a zero-shot study, their defaults, loading and validation.

A study file's ``get_config()`` starts from ``defaults()``, a locked ml_collections ConfigDict
(an unknown field or an ill-typed value fails where it is set), and sets what differs::

    def get_config():
        c = spec.defaults()  # from dali_jax.study import spec
        c.methods, c.seeds, c.settings = ("dreamer_dr", "dali_d"), (0, 1, 2), ("single_0",)
        c.preset = "cpu"
        c.overrides["run.steps"] = 50_000
        return c

``load(path)`` returns the validated study; every error is a ``StudyError`` naming the field
(``study.<field>``) and the valid values.
"""
from __future__ import annotations

import functools
import os
import re
import runpy

import ml_collections

from dali_jax import config as config_lib
from dali_jax import presets
from dali_jax.envs import contexts as C
from dali_jax.methods import METHODS

RELEASE_SEEDS = (0, 42, 1337, 13, 71, 1994, 1997, 908, 2102, 3)  # docs/protocol.md
BACKENDS = ("local", "slurm")
# Config fields the study sets per run; an override of them is an error.
RUN_FIELDS = ("task", "obs", "method", "seed", "context_setting", "logdir")
# Free-form mappings: left unlocked, their keys are checked by validate().
_FREE = ("overrides", "variants", "method_overrides", "backend.slurm.extra")


class StudyError(ValueError):
    """A bad study file (the message names the field and the valid values), or a backend
    that cannot run here."""


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
    # c.overrides["run.steps"] = 50_000 (not the study's own fields: RUN_FIELDS).
    c.overrides = ml_collections.ConfigDict(allow_dotted_keys=True)
    # Method -> {dotted config path: value}, applied after `overrides` to that method's runs
    # only, e.g. c.method_overrides["dali_d"] = {"context.loss": "inverse"}.
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
    c.lock()
    for path in _FREE:
        _get(c, path).unlock()
    return c


def _get(c, path: str):
    return functools.reduce(getattr, path.split("."), c)


def load(path: str) -> ml_collections.ConfigDict:
    """Study file -> validated study ConfigDict (``name`` defaults to the file's stem)."""
    if not os.path.isfile(path):
        raise StudyError(f"study file {path} not found")
    try:
        get_config = runpy.run_path(path).get("get_config")
        if get_config is None:
            raise NameError("the file defines no get_config()")
        study = get_config()
        if not isinstance(study, ml_collections.ConfigDict) or "backend" not in study:
            raise TypeError(f"get_config() must return spec.defaults() with its fields set; "
                            f"got {type(study).__name__}")
    except Exception as e:  # noqa: BLE001 - any error of the user's file
        msg = str(e.args[0] if len(e.args) == 1 else e).strip("'")
        if ". Other fields present" in msg:  # ml_collections lists every field: keep its hint
            hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', msg)
            msg = msg.split(". Other fields present")[0] + (f"; {hint[0]}" if hint else "")
        raise StudyError(f"study file {path}: {type(e).__name__}: {msg}") from e
    if not study.name:
        study.name = os.path.splitext(os.path.basename(path))[0]
    validate(study)
    return study


# ----------------------------------------------------------------------------- validation
def _fail(field: str, msg: str):
    raise StudyError(f"study.{field} {msg}")


def _choices() -> dict:
    """Fields with a fixed set of values -> the values."""
    return {"task": C.TASKS, "obs": config_lib.OBS_MODES, "preset": presets.NAMES,
            "evaluation.contexts": ("all", "scored"), "evaluation.mode": ("sample", "mode"),
            "backend.name": BACKENDS, "backend.slurm.cluster": ("slurm", "local", "debug")}


def _sequence(field: str, value) -> tuple:
    if not value:
        _fail(field, "must not be empty")
    dup = sorted({str(v) for v in value if list(value).count(v) > 1})
    if dup:
        _fail(field, f"lists {', '.join(dup)} more than once")
    return tuple(value)


def _no_run_fields(field: str, keys) -> None:
    for key in keys:
        if key in RUN_FIELDS:
            _fail(f"{field}[{key!r}]", f"is set by the study (one of {', '.join(RUN_FIELDS)}); "
                                      f"use the study's own fields instead")


# Integer fields and their minimum (types are enforced by the locked ConfigDict).
_MINIMUM = {"evaluation.episodes": 1, "evaluation.num_envs": 1, "evaluation.random_episodes": 1,
            "evaluation.random_seeds": 1, "report.reps": 1, "report.seed": 0,
            "backend.local.concurrency": 0, "backend.slurm.time_min": 1,
            "backend.slurm.eval_time_min": 1, "backend.slurm.gpus_per_node": 0,
            "backend.slurm.cpus_per_task": 1, "backend.slurm.mem_gb": 0,
            "backend.slurm.array_parallelism": 1}


def validate(s) -> None:
    """Checks the values of a study; raises StudyError naming the field and valid values."""
    for field, options in _choices().items():
        if _get(s, field) not in options:
            _fail(field, f"must be one of {', '.join(options)}; got {_get(s, field)!r}")
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
    f0, f1 = C.FACTORS[s.task]
    choices = {"default": "the default context only", "single_0": f"{f0} varied",
               "single_1": f"{f1} varied", "double_box": f"{f0} and {f1} varied",
               "specific": "one fixed context (config.specific_context)"}
    for name in _sequence("settings", s.settings):
        if name not in choices:
            valid = "; ".join(f"{k} ({v})" for k, v in choices.items())
            _fail("settings", f"lists {name!r}, which is not a context setting of {s.task}; "
                              f"valid settings: {valid}")
    _no_run_fields("overrides", s.overrides.keys())
    for method, over in s.method_overrides.items():
        if method not in s.methods:
            _fail(f"method_overrides[{method!r}]", f"names a method the study does not run; "
                                                    f"its methods: {', '.join(s.methods)}")
        if not hasattr(over, "keys"):
            _fail(f"method_overrides[{method!r}]", f"must be a mapping of config path -> "
                                                    f"value; got {type(over).__name__}")
        _no_run_fields(f"method_overrides[{method!r}]", over.keys())
    unscored = [x for x in s.settings if x not in C.SCORED_SETTINGS]
    if s.evaluation.contexts == "scored" and unscored:
        _fail("evaluation.contexts", f"is 'scored', but setting(s) {', '.join(unscored)} "
                                     f"score no grid context; use 'all'")
    for field, minimum in _MINIMUM.items():
        if _get(s, field) < minimum:
            _fail(field, f"must be >= {minimum}; got {_get(s, field)!r}")
    if not 0 < s.report.confidence < 1:
        _fail("report.confidence", f"must lie in (0, 1); got {s.report.confidence!r}")
    if not all(isinstance(x, str) for x in s.backend.slurm.setup):
        _fail("backend.slurm.setup", f"must be a list of shell lines; got "
                                     f"{s.backend.slurm.setup!r}")

"""Command-line launch of experiment files: `--preset NAME` and `--config.a.b=value` overrides.

Unknown fields are rejected with the list of valid fields at that level; values are parsed
with the type of the default (int, float, bool, str) and a wrong type is rejected; the
resulting config is validated (`config.validate`) before anything starts.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

import ml_collections

from dali_jax import config as config_lib
from dali_jax import hostmem


class UsageError(ValueError):
    pass


def _parse_value(name: str, text: str, default):
    if isinstance(default, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--config.{name} expects a bool (true/false); got {text!r}")
    if isinstance(default, int):
        try:
            return int(float(text)) if float(text).is_integer() else int(text)
        except ValueError:
            raise UsageError(f"--config.{name} expects an int; got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"--config.{name} expects a float; got {text!r}") from None
    return text


def apply_overrides(config: ml_collections.ConfigDict, args: Sequence[str]):
    """Applies `--config.a.b=value` (or `--config.a.b value`) arguments in place."""
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise UsageError(f"unknown argument {arg!r}; use --preset NAME and "
                             "--config.FIELD=VALUE")
        body = arg[len("--config."):]
        if "=" in body:
            name, text = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise UsageError(f"{arg} needs a value")
            name, text = body, args[i + 1]
            i += 1
        try:
            node, leaf = config_lib.field_parent(config, name)
        except config_lib.FieldError as exc:
            raise UsageError(f"unknown field --config.{name}: {exc}") from None
        default = node[leaf]
        if isinstance(default, ml_collections.ConfigDict):
            raise UsageError(f"--config.{name} is a group; set one of its fields: "
                             f"{', '.join(sorted(default.keys()))}")
        try:
            config_lib.set_path(config, name, _parse_value(name, text, default))
        except ValueError as exc:  # an unknown alignment recipe
            raise UsageError(f"--config.{name}: {exc}") from None
        i += 1
    return config


def split_variant(spec: str) -> tuple[str, list[str]]:
    """`NAME@key=value;key=value` (a benchmark's method or option with config overrides)
    -> (NAME, ["--config.key=value", ...]) for `apply_overrides`."""
    name, _, overrides = spec.partition("@")
    return name, [f"--config.{item.strip()}" for item in overrides.split(";") if item.strip()]


def apply_variant(config: ml_collections.ConfigDict, spec: str, flag: str):
    """Applies the overrides of `spec` (`split_variant`) in place; a bad one exits naming
    the command-line `flag` that carried it. -> config."""
    try:
        return apply_overrides(config, split_variant(spec)[1])
    except UsageError as e:
        raise SystemExit(f"{flag} {spec}: {e}") from None


def parse(get_config: Callable, argv: Sequence[str], presets: Sequence[str]):
    """argv (without the program name) -> validated ConfigDict."""
    argv = list(argv)
    preset = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i].startswith("--preset="):
            preset = argv[i].split("=", 1)[1]
        elif argv[i] == "--preset":
            if i + 1 >= len(argv):
                raise UsageError("--preset needs a value")
            preset = argv[i + 1]
            i += 1
        else:
            rest.append(argv[i])
        i += 1
    if preset is not None and preset not in presets:
        raise UsageError(f"--preset must be one of {', '.join(presets)}; got {preset!r}")
    config = get_config(preset)
    apply_overrides(config, rest)
    config_lib.validate(config)
    return config


def config_summary(config) -> str:
    """The run's configuration in a few lines (printed before training starts)."""
    from dali_jax.methods import RECIPES
    lines = [f"{config.task} ({config.obs}), method {config.method}, context setting "
             f"{config.context_setting}, seed {config.seed}",
             f"model {config.model.size}, {config.run.steps:,} env steps, train ratio "
             f"{config.run.train_ratio:g}, batch {config.train.batch_size} x "
             f"{config.train.batch_length}, logdir {config.logdir or '(default)'}"]
    if RECIPES[config.method].get("source") == "inferred":
        a = config_lib.alignment_summary(config)
        lines.append("alignment: " + ", ".join(f"{k} {v}" for k, v in a.items()
                                               if v is not None))
    return "\n".join(lines)


def enable_compilation_cache():
    """JAX's persistent compilation cache (JAX_COMPILATION_CACHE_DIR or ~/.cache/dali_jax)."""
    import jax
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "dali_jax", "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(get_config: Callable, presets: Sequence[str], argv=None) -> int:
    """Entry point of an experiment file: parse, train, print the summary."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        cfg = get_config(None)
        print(f"usage: {os.path.basename(sys.argv[0])} [--preset {{{','.join(presets)}}}] "
              "[--config.FIELD=VALUE ...]\n\nfields and defaults:\n" + str(cfg))
        return 0
    try:
        config = parse(get_config, argv, presets)
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("MUJOCO_GL", "egl")
    # Our own messages at INFO; other libraries' (JAX's backend probing, PyOpenGL's notices)
    # from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("dali_jax").setLevel(logging.INFO)
    print(config_summary(config), flush=True)
    hostmem.tune_malloc()
    enable_compilation_cache()
    from dali_jax.training.train import train
    summary = train(config)
    keys = ("env_steps", "updates", "episodes", "wall_s", "logdir", "eval/return_mean")
    print({k: summary[k] for k in keys if k in summary})
    return 0

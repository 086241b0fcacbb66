"""Command-line launch of experiments: parse the overrides (`dali_jax.overrides`), print the
configuration, train. The experiment files call `main`; without them (an installed package):

    python -m dali_jax.launch --task ball_in_cup|walker [--preset P] [--config.FIELD=VALUE ...]
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from dali_jax import config as config_lib
from dali_jax import hostmem, presets
from dali_jax.overrides import UsageError, parse


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


def main_task(argv=None) -> int:
    """`python -m dali_jax.launch --task TASK ...`: `main` with `presets.experiment_config`."""
    import argparse
    import functools
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", default=None)
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.task is None and any(a in ("-h", "--help") for a in rest):
        print(f"usage: python -m dali_jax.launch --task {{{','.join(presets.TASK_STEPS)}}} "
              f"[--preset {{{','.join(presets.NAMES)}}}] [--config.FIELD=VALUE ...]\n"
              "(--task TASK --help lists every field and its default)")
        return 0
    if args.task not in presets.TASK_STEPS:
        print(f"error: give --task {'|'.join(presets.TASK_STEPS)}; got {args.task!r}",
              file=sys.stderr)
        return 2
    return main(functools.partial(presets.experiment_config, args.task), presets.NAMES, rest)


if __name__ == "__main__":
    sys.exit(main_task())

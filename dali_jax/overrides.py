"""Command-line config overrides: `--preset NAME` and `--config.a.b=value`, parsed by
ml_collections' config_flags (with the type of each field's default) into a fresh absl
FlagValues per call, so that configs can be built in-process as often as needed (the study
runner builds one per run).

What config_flags lacks, added here: presets; an unknown field is an error naming the valid
fields of its group; setting `context.alignment` also sets the fields of its recipe
(`config.set_alignment`), and a recipe field given beside it keeps its given value, so that
`config.validate` names the conflict. The result is validated.
"""
from __future__ import annotations

from typing import Callable, Sequence

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags

from dali_jax import config as config_lib

_PROG = "dali_jax"


class UsageError(ValueError):
    pass


def _check_field(config, arg: str) -> None:
    """`--config.a.b[=v]` must name a leaf field of config (UsageError otherwise)."""
    path = arg.split("=", 1)[0][len("--config."):]
    node, parts = config, path.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            group = ".".join(parts[:depth]) or "config"
            valid = ", ".join(sorted(node.keys())) if isinstance(
                node, ml_collections.ConfigDict) else "none"
            raise UsageError(f"unknown field --config.{path}: {group} has no field {part!r}. "
                             f"Valid fields: {valid}")
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise UsageError(f"--config.{path} is a group; set one of its fields: "
                         f"{', '.join(sorted(node.keys()))}")


def apply_overrides(config: ml_collections.ConfigDict, args: Sequence[str]):
    """Applies `--config.a.b=value` (or `--config.a.b value`) arguments in place. -> config."""
    args = list(args)
    for arg in args:
        if arg.startswith("--config."):
            _check_field(config, arg)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, flag_values=fv, sys_argv=[_PROG, *args])
    try:
        rest = fv([_PROG, *args])
    except flags.Error as e:
        raise UsageError(str(e)) from None
    if rest[1:]:
        raise UsageError(f"unknown argument {rest[1]!r}; use --preset NAME and "
                         "--config.FIELD=VALUE")
    given = {name[len("config."):]: fv[name].value for name in fv
             if name.startswith("config.") and fv[name].present}
    if "context.alignment" in given:
        try:
            config_lib.set_alignment(config, given["context.alignment"])
        except ValueError as e:  # an unknown recipe
            raise UsageError(f"--config.context.alignment: {e}") from None
        for field in config_lib.ALIGNMENTS.get(given["context.alignment"], {}):
            if f"context.{field}" in given:  # given beside the recipe: validate names it
                config.context[field] = given[f"context.{field}"]
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
    """argv (without the program name): `--preset NAME` (or `--preset=NAME`) and config
    overrides -> validated ConfigDict of get_config(preset)."""
    argv, preset, rest = list(argv), None, []
    while argv:
        arg = argv.pop(0)
        if arg == "--preset":
            if not argv:
                raise UsageError("--preset needs a value")
            preset = argv.pop(0)
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if preset is not None and preset not in presets:
        raise UsageError(f"--preset must be one of {', '.join(presets)}; got {preset!r}")
    config = apply_overrides(get_config(preset), rest)
    config_lib.validate(config)
    return config

"""Load a trained run (config + agent + parameters) from its logdir, for analysis tools."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Type

import ml_collections

from dali_jax import config as config_lib
from dali_jax.agent import Agent, Spec
from dali_jax.training.checkpoint import CheckpointError, Checkpointer


@dataclasses.dataclass
class Run:
    logdir: str
    config: Any
    agent: Agent
    params: dict
    step: int
    extra: dict


def load_config(logdir: str) -> ml_collections.ConfigDict:
    """The run's config.json over today's defaults: fields added since the run was written
    take their defaults (`config.with_defaults`)."""
    path = os.path.join(logdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{logdir} is not a dali_jax run directory: no config.json "
                                f"(expected {path})")
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return ml_collections.ConfigDict(config_lib.with_defaults(saved,
                                                             config_lib.get_config().to_dict()))


def spec_for(config) -> Spec:
    """Observation/action spec of the run's task, read off one env instance."""
    from dali_jax.envs.dmc import make_env
    from dali_jax.training.setup import env_spec, training_contexts
    env = make_env(config.task, training_contexts(config), obs_mode=config.obs, seed=0)
    try:
        act = env.action_space
        return Spec(obs=env_spec(env.observation_space), action_dim=int(act.shape[0]))
    finally:
        env.close()


def load_run(logdir: str, step: Optional[int] = None, task: Optional[str] = None) -> Run:
    """-> Run. Raises FileNotFoundError (no run / no checkpoint), CheckpointError (corrupt or
    incompatible) or ValueError (the run is of another task than `task`)."""
    config = load_config(logdir)
    if task is not None and config.task != task:
        raise ValueError(f"{logdir} is a {config.task} run, not {task}")
    ckdir = os.path.join(logdir, "checkpoints")
    ck = Checkpointer(ckdir)
    if ck.latest_step() is None:
        raise FileNotFoundError(f"{logdir} has no checkpoint (looked in {ckdir})")
    agent = Agent(config, spec_for(config))
    from dali_jax.training.resume import restore_checkpoint
    step, tree, extra = restore_checkpoint(ck, agent, step=step, replay=False)
    return Run(logdir, config, agent, tree["agent"].params, step, extra)


def _require_dir(logdir: str, error_cls: Type[Exception]) -> None:
    if not os.path.isdir(logdir):
        raise error_cls(f"{logdir}: no such run directory")


def load_config_or_raise(logdir: str, error_cls: Type[Exception]) -> ml_collections.ConfigDict:
    """`load_config` for CLI tools: a missing directory, a missing config or bad JSON is
    raised as `error_cls(message)`."""
    _require_dir(logdir, error_cls)
    try:
        return load_config(logdir)
    except (FileNotFoundError, ValueError) as e:
        raise error_cls(str(e)) from None


def load_run_or_raise(logdir: str, error_cls: Type[Exception], step: Optional[int] = None,
                      task: Optional[str] = None) -> Run:
    """`load_run` for CLI tools: a missing directory and every error `load_run` documents are
    raised as `error_cls(message)`."""
    _require_dir(logdir, error_cls)
    try:
        return load_run(logdir, step=step, task=task)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise error_cls(str(e)) from None

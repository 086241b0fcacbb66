"""Reading a trainer checkpoint back: the agent state as a `TrainState`, the replay and the
RNG as stored."""
from __future__ import annotations

from typing import Optional

import jax

from dali_jax.agent.core import TrainState
from dali_jax.training.checkpoint import Checkpointer


def restore_checkpoint(ckpt: Checkpointer, agent, step: Optional[int] = None,
                       replay: bool = True) -> tuple[int, dict, dict]:
    """(step, tree, extra) of a trainer checkpoint; tree["agent"] is a TrainState like
    agent.init's, tree["replay"] and tree["rng"] (dict(key)) as stored (not read when `replay` is
    False). CheckpointError naming the checkpoint and the leaf when it does not fit."""
    template = dict(agent=jax.eval_shape(lambda k: agent.init(k).state_dict(),
                                         jax.random.PRNGKey(0)))
    if replay:
        template.update(replay=None, rng=None)
    step, tree, extra = ckpt.restore(template, step=step)
    tree["agent"] = TrainState(**tree["agent"])
    return step, tree, extra

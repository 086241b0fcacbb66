"""Reading a trainer checkpoint back: the agent state in today's layout, the replay and the
RNG as stored."""
from __future__ import annotations

import logging
from typing import Optional

import jax
import numpy as np

from dali_jax.training.checkpoint import AS_STORED, Checkpointer

log = logging.getLogger("dali_jax.train")


def restore_checkpoint(ckpt: Checkpointer, agent, step: Optional[int] = None,
                       replay: bool = True) -> tuple[int, dict, dict]:
    """(step, tree, extra) of a trainer checkpoint; tree["agent"] is a TrainState like
    agent.init's (older layouts upgraded, leaves it no longer has left out), tree["replay"]
    and tree["rng"] as stored, or not read when `replay` is False. CheckpointError naming
    the checkpoint and the leaf when it does not fit."""
    template = dict(agent=jax.eval_shape(agent.init, jax.random.PRNGKey(0)))
    if replay:
        template.update(replay=AS_STORED, rng=AS_STORED)
    return ckpt.restore(template, step=step, upgrade=upgrade_checkpoint, partial=True)


def upgrade_checkpoint(tree):
    """A stored trainer tree (nested dicts) in today's layout: the one-layer posterior
    (obs_out, before it was split into obs_h / obs_e) read as the split layers."""
    agent = tree.get("agent") if isinstance(tree, dict) else None
    if agent is not None and _split_legacy_posterior(agent):
        log.info("checkpoint: its one-layer posterior (obs_out) read as obs_h / obs_e")
    return tree


def _split_legacy_posterior(node) -> bool:
    """In place: every RSSM dict (params and the optimiser's moments alike) holding the old
    posterior layer obs_out = {kernel ((deter + E + Cc), U), norm} gets obs_h (the kernel's
    first deter rows), obs_e (the rest) and obs_norm instead: the same function."""
    found = False
    if isinstance(node, dict):
        old = node.get("obs_out")
        if isinstance(old, dict) and "obs_h" not in node and "initial" in node:
            deter = np.shape(node["initial"])[0]
            node["obs_h"] = dict(kernel=old["kernel"][:deter])
            node["obs_e"] = dict(kernel=old["kernel"][deter:])
            node["obs_norm"] = old["norm"]
            del node["obs_out"]
            found = True
        for v in list(node.values()):
            found = _split_legacy_posterior(v) or found
    elif isinstance(node, (list, tuple)):
        for v in node:
            found = _split_legacy_posterior(v) or found
    return found

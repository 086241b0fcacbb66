"""Policy rollouts for evaluation: episodes of an agent on given contexts.

`evaluate_contexts` runs `episodes` episodes on each context with up to `num_envs` envs
stepped together (each env is pinned to one context), acting with `agent.policy_step`.
"""
from __future__ import annotations

import functools
from typing import Mapping

import jax
import numpy as np

from dali_jax.envs.dmc import make_env
from dali_jax.envs.vector import VectorEnv


def evaluate_contexts(agent, params, task: str, obs_mode: str,
                      contexts: Mapping[int, Mapping[str, float]], episodes: int = 1,
                      num_envs: int = 4, seed: int = 0, mode: str = "sample",
                      parallel: bool = True, episode_length: int = 1000,
                      frames: bool = False, progress=None) -> dict:
    """-> {context id: [episode returns]} (and, with `frames`, the first episode's images
    under key "frames" as {context id: (L, 64, 64, 3) uint8}). progress(n), if given, is
    called with the number of episodes each batch finished."""
    jobs = [(cid, e) for cid in contexts for e in range(episodes)]
    returns = {cid: [] for cid in contexts}
    out_frames = {}
    obs_env = obs_mode
    if frames and obs_mode == "features":
        obs_env = "both"
    key = jax.random.PRNGKey(seed)
    for start in range(0, len(jobs), num_envs):
        chunk = jobs[start:start + num_envs]
        fns = [functools.partial(make_env, task, {cid: dict(contexts[cid])}, obs_mode=obs_env,
                                 seed=seed * 100003 + 7919 * i + start, time_limit=episode_length)
               for i, (cid, _) in enumerate(chunk)]
        venv = VectorEnv(fns, parallel=parallel and len(fns) > 1)
        try:
            obs = venv.reset()
            carry = agent.initial_carry(params, len(chunk))
            done = np.zeros(len(chunk), bool)
            rets = np.zeros(len(chunk))
            imgs = [[] for _ in chunk]
            while not done.all():
                key, sub = jax.random.split(key)
                action, carry = agent.policy_step(params, carry, obs, sub, mode=mode)
                action = np.asarray(action)
                if frames:
                    for i, (cid, ep) in enumerate(chunk):
                        if ep == 0 and not done[i]:
                            imgs[i].append(obs["image"][i])
                obs, _ = venv.step(action)
                rets += np.where(done, 0.0, obs["reward"])
                done |= obs["is_last"]
            for i, (cid, ep) in enumerate(chunk):
                returns[cid].append(float(rets[i]))
                if frames and ep == 0:
                    out_frames[cid] = np.stack(imgs[i])
            if progress is not None:
                progress(len(chunk))
        finally:
            venv.close()
    if frames:
        returns["frames"] = out_frames
    return returns


def evaluation_scalars(agent, params, config, contexts: dict, episodes: int,
                       num_envs: int) -> dict:
    """The trainer's periodic evaluation: `evaluate_contexts` on `contexts` (id -> factor
    dict) -> {"eval/return_ctx/<factor values>": mean return, "eval/return_mean": mean of
    those}."""
    res = evaluate_contexts(agent, params, config.task, config.obs, contexts, episodes,
                            num_envs=num_envs, seed=config.seed + 1,
                            parallel=config.run.parallel_envs,
                            episode_length=config.run.episode_length)
    out = {}
    for cid, rets in res.items():
        name = "_".join(f"{v:g}" for v in contexts[cid].values())
        out[f"eval/return_ctx/{name}"] = float(np.mean(rets))
    out["eval/return_mean"] = float(np.mean([np.mean(r) for r in res.values()]))
    return out

"""Episodes for the context analyses: collection on a context grid, splits, training batches.

Pure functions (numpy in, numpy out) used by ``python -m dali_jax.probe``, the benchmarks and
the tests:

* ``collect_random_episodes(task, contexts, episodes_per_context, length, seed)``: uniform-random
  actions on a contextual env; fixed-length episodes in the training batch format.
* ``collect_agent_episodes(agent, params, task, contexts, ...)``: the same, with a trained
  agent's policy acting (the states the agent itself visits).
* ``context_grid(task, n, factors)``: n * n contexts over the train ranges of the task's
  factors (a grid for both, evenly spaced values for one).
* ``heldout_split(episodes, test_per_context)``: stratified split by episode.
* ``sample_batch`` / ``fit_world_model``: world-model-only training (``Agent.model_step``) on
  collected episodes.

Episode dict (E episodes of `length` env steps -> L = length + 1 rows, row t = step t):
``obs`` float32 (E, L, D) (``image`` uint8 (E, L, 64, 64, 3) for pixels), ``context``
float32 (E, L, 2) normalised ground truth, ``action`` float32 (E, L, A) the action taken at
step t (zeros at the last row, as no action follows it), ``reward`` float32 (E, L) (reward on
arriving at t, 0 at t = 0), ``is_first`` / ``is_last`` / ``is_terminal`` bool (E, L),
``factors`` float64 (E, F) the raw factor values, ``factor_names`` tuple (F,),
``context_id`` (E,) and ``episode`` int (E,) the episode's index within its context.
"""
from __future__ import annotations

import functools
import logging
from typing import Mapping, Sequence

import jax
import numpy as np

from dali_jax.envs import contexts as C

log = logging.getLogger(__name__)

__all__ = ["context_grid", "collect_random_episodes", "collect_agent_episodes",
           "agent_env_seed", "select", "heldout_split", "sample_batch", "fit_world_model"]

_MAX_RETRIES = 10


def context_grid(task: str, n: int = 4,
                 factors: Sequence[str] | None = None) -> dict[int, dict[str, float]]:
    """n * n contexts (ids 0..n*n-1) over the train ranges of `factors` (default: both of
    the task's), the other factor at its default: an n x n grid for two factors, n * n evenly
    spaced values for one."""
    names = tuple(C.FACTORS[task])
    factors = names if factors is None else tuple(factors)
    if not factors or any(f not in names for f in factors) or len(set(factors)) < len(factors):
        raise ValueError(f"factors must be one or both of {names}; got {factors}")
    default = {f: round(float(C.DEFAULTS[task][f]), 6) for f in names}
    axes = [np.linspace(*C.train_range(task, f), n if len(factors) == 2 else n * n)
            for f in factors]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(factors))
    return {i: {**default, **{f: round(float(v), 6) for f, v in zip(factors, p)}}
            for i, p in enumerate(points)}


def collect_random_episodes(task: str, contexts: Mapping | Sequence[Mapping],
                            episodes_per_context: int, length: int, seed: int = 0,
                            obs_mode: str = "features", action_repeat: int = 1) -> dict:
    """Uniform-random-policy episodes of `length` env steps under every context.

    A new uniform action is drawn every `action_repeat` steps and held in between (1: i.i.d.
    actions, the replay prefill's policy); the stored action is always the one applied.

    contexts: {id: {factor: value}} or a list of such dicts (ids 0..n-1); missing factors take
    their defaults. Episodes cut short by a physics instability are discarded and drawn again.
    Returns the episode dict described in the module docstring, episodes ordered by context
    (in the order given), then by episode index.
    """
    from dali_jax.envs.dmc import make_env

    if not isinstance(contexts, Mapping):
        contexts = dict(enumerate(contexts))
    if not contexts:
        raise ValueError("contexts must not be empty")
    if episodes_per_context < 1 or length < 1 or action_repeat < 1:
        raise ValueError("episodes_per_context, length and action_repeat must be >= 1")
    env = make_env(task, dict(contexts), obs_mode=obs_mode, seed=seed, time_limit=length)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    A = int(np.prod(env.action_space.shape))
    names = tuple(env.context_features)
    keys = [k for k in env.observation_space.spaces]
    out = {k: [] for k in keys + ["action", "reward", "is_first", "is_last", "is_terminal"]}
    factors, cids, epi = [], [], []
    try:
        for cid in contexts:
            for e in range(episodes_per_context):
                for _ in range(_MAX_RETRIES):
                    ep = _random_episode(env, cid, length, rng, low, high, A, keys, action_repeat)
                    if ep is not None:
                        break
                else:
                    raise RuntimeError(f"{task}: {_MAX_RETRIES} unstable episodes in a row "
                                       f"under context {contexts[cid]}")
                for k, v in ep.items():
                    out[k].append(v)
                factors.append([env.contexts[cid][n] for n in names])
                cids.append(cid)
                epi.append(e)
    finally:
        env.close()
    res = {k: np.stack(v) for k, v in out.items()}
    res.update(factors=np.asarray(factors, np.float64), factor_names=names,
               context_id=np.asarray(cids), episode=np.asarray(epi, np.int64))
    return res


def collect_agent_episodes(agent, params, task: str, contexts: Mapping | Sequence[Mapping],
                           episodes_per_context: int, length: int, seed: int = 0,
                           obs_mode: str = "features", mode: str = "sample") -> dict:
    """The agent's own episodes: its policy (`agent.policy_step`, `mode` "sample" as in
    training and evaluation, or "mode") acts in `episodes_per_context` envs per context,
    one vectorised batch per context, for `length` env steps.

    Same arguments and episode dict as `collect_random_episodes` (the action of row t is the
    executed one). Env i of context number n (in the order given) is seeded with
    `agent_env_seed(seed, n, i)`. Raises RuntimeError when an episode ends early (a physics
    instability): try another seed.
    """
    from dali_jax.envs.dmc import make_env
    from dali_jax.envs.vector import VectorEnv

    if not isinstance(contexts, Mapping):
        contexts = dict(enumerate(contexts))
    if not contexts:
        raise ValueError("contexts must not be empty")
    if episodes_per_context < 1 or length < 1:
        raise ValueError("episodes_per_context and length must be >= 1")
    names = tuple(C.FACTORS[task])
    keys = list(agent.spec.obs)
    out = {k: [] for k in keys + ["action", "reward", "is_first", "is_last", "is_terminal"]}
    factors, cids, epi = [], [], []
    key = jax.random.PRNGKey(seed)
    E = episodes_per_context
    for n, cid in enumerate(contexts):
        ctx = {f: float(C.DEFAULTS[task][f]) for f in names}
        ctx.update(contexts[cid])
        fns = [functools.partial(make_env, task, {0: dict(ctx)}, obs_mode=obs_mode,
                                 seed=agent_env_seed(seed, n, i), time_limit=length)
               for i in range(E)]
        venv = VectorEnv(fns, parallel=False)
        try:
            obs = venv.reset()
            carry = agent.initial_carry(params, E)
            rows = {k: [np.asarray(obs[k])]
                    for k in keys + ["reward", "is_first", "is_last", "is_terminal"]}
            actions = []
            for t in range(length):
                key, sub = jax.random.split(key)
                action, carry = agent.policy_step(params, carry, obs, sub, mode=mode)
                actions.append(np.asarray(action, np.float32))
                obs, _ = venv.step(actions[-1])
                if np.asarray(obs["is_first"]).any() or (
                        np.asarray(obs["is_last"]).any() and t < length - 1):
                    raise RuntimeError(f"{task}: an episode under context {ctx} ended early "
                                       f"at step {t + 1} (physics instability?); try another "
                                       "seed")
                for k in rows:
                    rows[k].append(np.asarray(obs[k]))
        finally:
            venv.close()
        actions.append(np.zeros_like(actions[-1]))
        ep = {k: np.swapaxes(np.stack(v), 0, 1) for k, v in rows.items()}
        ep["action"] = np.swapaxes(np.stack(actions), 0, 1)
        ep["reward"] = ep["reward"].astype(np.float32)
        for k in ("is_first", "is_last", "is_terminal"):
            ep[k] = ep[k].astype(bool)
        for k, v in ep.items():
            out[k].extend(v)
        factors += [[ctx[f] for f in names]] * E
        cids += [cid] * E
        epi += list(range(E))
    res = {k: np.stack(v) for k, v in out.items()}
    res.update(factors=np.asarray(factors, np.float64), factor_names=names,
               context_id=np.asarray(cids), episode=np.asarray(epi, np.int64))
    return res


def agent_env_seed(seed: int, context_index: int, env_index: int) -> int:
    """Seed of env `env_index` of the `context_index`-th context in `collect_agent_episodes`."""
    return (seed * 1009 + context_index) * 100003 + 7919 * env_index


def _random_episode(env, cid, length, rng, low, high, A, keys, repeat=1):
    obs, _ = env.reset(options={"context_id": cid})
    rows = {k: [obs[k]] for k in keys}
    actions, rewards = [], [0.0]
    for t in range(length):
        if t % repeat == 0:
            a = rng.uniform(low, high, (A,)).astype(np.float32)
        obs, r, terminated, truncated, info = env.step(a)
        actions.append(a)
        rewards.append(r)
        for k in keys:
            rows[k].append(obs[k])
        if info.get("unstable") or ((terminated or truncated) and t < length - 1):
            log.warning("episode under context %r ended early at step %d; drawing another",
                        cid, t + 1)
            return None
    L = length + 1
    actions.append(np.zeros(A, np.float32))
    ep = {k: np.stack(v) for k, v in rows.items()}
    ep["action"] = np.stack(actions)
    ep["reward"] = np.asarray(rewards, np.float32)
    ep["is_first"] = np.arange(L) == 0
    ep["is_last"] = np.arange(L) == L - 1
    ep["is_terminal"] = np.zeros(L, bool)
    return ep


def select(episodes: dict, mask) -> dict:
    """The episodes where `mask` (E,) is True (or the given indices)."""
    idx = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
    return {k: (v if k == "factor_names" else np.asarray(v)[idx]) for k, v in episodes.items()}


def heldout_split(episodes: dict, test_per_context: int = 1):
    """Stratified split by episode: the last `test_per_context` episodes of every context are
    held out. -> (train mask (E,), test mask (E,))."""
    n = np.zeros(len(episodes["episode"]), np.int64)
    for cid in np.unique(episodes["context_id"]):
        m = episodes["context_id"] == cid
        n[m] = m.sum()
    test = episodes["episode"] >= n - test_per_context
    if test.all() or not test.any():
        raise ValueError(f"test_per_context={test_per_context} leaves an empty split")
    return ~test, test


# ----------------------------------------------------------------------- model-only training

def sample_batch(episodes: dict, keys: Sequence[str], batch: int, length: int,
                 rng: np.random.Generator) -> dict:
    """(batch, length) chunks drawn uniformly inside random episodes (training batch format;
    `keys` are the observation keys to include). The first row of a chunk is `is_first`."""
    E, L = episodes["is_first"].shape
    if length > L:
        raise ValueError(f"chunk length {length} exceeds the episode length {L}")
    e = rng.integers(0, E, batch)
    s = rng.integers(0, L - length + 1, batch)
    t = s[:, None] + np.arange(length)[None]
    out = {k: episodes[k][e[:, None], t] for k in
           tuple(keys) + ("action", "reward", "is_first", "is_last", "is_terminal")}
    out["is_first"] = out["is_first"].copy()
    out["is_first"][:, 0] = True
    return out


def fit_world_model(agent, state, episodes: dict, updates: int, seed: int = 0,
                    log_every: int = 0):
    """`updates` world-model-only updates (`agent.model_step`, which donates `state`) on
    sequences of `episodes` (`agent.sequence_length` steps: context history + chunk).
    -> (state, list of per-logged-update metric dicts)."""
    cfg = agent.config.train
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    keys = tuple(agent.spec.obs)
    history = []
    for i in range(updates):
        b = sample_batch(episodes, keys, cfg.batch_size, agent.sequence_length, rng)
        state, metrics = agent.model_step(state, b, key)
        if log_every and (i % log_every == 0 or i == updates - 1):
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m["update"] = i
            history.append(m)
    return state, history

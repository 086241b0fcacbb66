"""Context analysis: random-policy or agent episodes, inferred contexts, linear probes, t-SNE.

Pure functions (numpy in, numpy out) used by ``python -m dali_jax.probe`` and the tests:

* ``collect_random_episodes(task, contexts, episodes_per_context, length, seed)``: uniform-random
  actions on a contextual env; fixed-length episodes in the training batch format.
* ``collect_agent_episodes(agent, params, task, contexts, ...)``: the same, with a trained
  agent's policy acting (the states the agent itself visits).
* ``context_grid(task, n, factors)``: n * n contexts over the train ranges of the task's
  factors (a grid for both, evenly spaced values for one).
* ``heldout_split(episodes, test_per_context)``: stratified split by episode.
* ``sample_batch`` / ``fit_world_model``: world-model-only training (``Agent.model_step``) on
  collected episodes.
* ``episode_contexts(agent, params, episodes)``: g_phi's context at every step, from the causal,
  episode-bounded windows used in training and acting.
* ``step_samples``: (context, factor) pairs of the steps whose window is full.
* ``linear_probe_r2(X_train, y_train, X_test, y_test)``: per-target R^2 of a ridge probe.
* ``variance_shares(ctx, context_id)``: how much of the context's variance is between
  contexts, between episodes of one context, and within an episode (over time).
* ``tsne_plot(C, labels, path)``: 2-D t-SNE of contexts coloured by the true factors.

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
import weakref
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dali_jax.envs import contexts as CTX

log = logging.getLogger(__name__)

__all__ = ["collect_random_episodes", "collect_agent_episodes", "context_grid", "heldout_split",
           "sample_batch", "fit_world_model", "episode_contexts", "step_samples", "window_probe",
           "window_means", "linear_probe_r2", "variance_shares", "tsne_plot"]

_MAX_RETRIES = 10


# ------------------------------------------------------------------------------------- data

def context_grid(task: str, n: int = 4,
                 factors: Sequence[str] | None = None) -> dict[int, dict[str, float]]:
    """n * n contexts (ids 0..n*n-1) over the train ranges of `factors` (default: both of
    the task's), the other factor at its default: an n x n grid for two factors, n * n evenly
    spaced values for one."""
    names = tuple(CTX.FACTORS[task])
    factors = names if factors is None else tuple(factors)
    if not factors or any(f not in names for f in factors) or len(set(factors)) < len(factors):
        raise ValueError(f"factors must be one or both of {names}; got {factors}")
    default = {f: round(float(CTX.DEFAULTS[task][f]), 6) for f in names}
    axes = [np.linspace(*CTX.train_range(task, f), n if len(factors) == 2 else n * n)
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
    names = tuple(CTX.FACTORS[task])
    keys = list(agent.spec.obs)
    out = {k: [] for k in keys + ["action", "reward", "is_first", "is_last", "is_terminal"]}
    factors, cids, epi = [], [], []
    key = jax.random.PRNGKey(seed)
    E = episodes_per_context
    for n, cid in enumerate(contexts):
        ctx = {f: float(CTX.DEFAULTS[task][f]) for f in names}
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


# --------------------------------------------------------------------------- inference

_INFER = weakref.WeakKeyDictionary()


def _infer_fn(agent):
    """Jitted (params, batch (N, K + T, ...)) -> (N, T, Cc): the context of the last T steps
    of each sequence, the first K steps being their history."""
    from dali_jax.models import context as C

    fn = _INFER.get(agent)
    if fn is None:
        K = agent.config.context.window

        def infer(params, batch):
            is_first = jnp.asarray(batch["is_first"]).at[:, 0].set(True)
            embed = None
            if agent.image_keys:
                obs = {k: batch[k] for k in agent.spec.obs}
                embed = agent.encoder.apply({"params": params["encoder"]}, obs)
            obs_vec = agent.token_obs(batch, embed)
            prev = agent.prev_actions(batch["action"].astype(jnp.float32), is_first)
            tok = C.tokens(obs_vec, prev)
            idx = C.window_indices(is_first, K)[:, K:]
            return agent.ctx_encoder.apply({"params": params["context"]["encoder"]}, tok, idx,
                                           method=C.ContextEncoder.chunk)

        fn = jax.jit(infer)
        _INFER[agent] = fn
    return fn


def _blocks(x: np.ndarray, K: int, T: int) -> np.ndarray:
    """(E, L, ...) episodes -> (E * nb, K + T, ...) sequences: block b holds steps
    [bT - K, (b + 1)T), the episode's first row repeated before its start and its last row
    after its end (nb = ceil(L / T))."""
    E, L = x.shape[:2]
    nb = -(-L // T)
    padded = np.concatenate([np.repeat(x[:, :1], K, 1), x,
                             np.repeat(x[:, -1:], nb * T - L, 1)], 1)
    return np.stack([padded[:, b * T:b * T + K + T] for b in range(nb)], 1).reshape(
        (E * nb, K + T) + x.shape[2:])


def episode_contexts(agent, params, episodes: dict, group: int | None = None,
                     block: int | None = None) -> np.ndarray:
    """Inferred context of every step of every episode: float32 (E, L, Cc).

    Step t's context is g_phi over the tokens [o_k, a_{k-1}] of the last K = window steps of
    the episode (edge-padded before its start): the causal windows of training and acting
    (`Agent.context_chunk` without `release_compat`). For `release_compat` runs, whose training
    windows were whole chunks (future steps included), the same causal windows are used.
    Episodes are cut into blocks of `block` steps (default K) that carry the K steps before
    them as history, as training sequences do, so memory grows with the episode's length,
    not its square; `group` blocks are processed per call (default: about 2^25 values of
    the attention's (pairs x sequence) arrays).
    """
    if not getattr(agent, "inferred", False):
        raise ValueError(f"method {agent.config.method!r} has no inferred context "
                         "(the probe needs a DALI method: dali_s, dali_s_chi or dali_d)")
    E, L = episodes["is_first"].shape
    K = agent.config.context.window
    T = block or K
    keys = tuple(agent.spec.obs) + ("action", "is_first")
    b = {k: _blocks(np.asarray(episodes[k]), K, T) for k in keys if k in episodes}
    N = b["is_first"].shape[0]
    if "context" in agent.spec.obs and "context" not in b:
        b["context"] = np.zeros((N, K + T) + tuple(agent.spec.obs["context"][0]), np.float32)
    if group is None:
        group = max(1, min(N, (1 << 25) // (T * K * (K + T))))
    fn = _infer_fn(agent)
    out = []
    for s in range(0, N, group):
        n = min(group, N - s)
        g = {k: v[s:s + n] for k, v in b.items()}
        if n < group:  # pad the last group so that every call has the same shapes
            g = {k: np.concatenate([v, np.repeat(v[-1:], group - n, 0)]) for k, v in g.items()}
        out.append(np.asarray(fn(params, g))[:n])
    ctx = np.concatenate(out).astype(np.float32)
    return ctx.reshape(E, -1, ctx.shape[-1])[:, :L]


def step_samples(ctx: np.ndarray, targets: np.ndarray, start: int = 0, stride: int = 1):
    """Probe samples from per-step contexts.

    ctx: (E, L, Cc); targets: (E, F) per-episode factors (or (E, L, F) per step).
    Keeps the steps start, start + stride, ... (use start = K - 1 for full windows).
    -> X (E * n, Cc), y (E * n, F), episode index (E * n,).
    """
    E, L, Cc = ctx.shape
    steps = np.arange(start, L, stride)
    if steps.size == 0:
        raise ValueError(f"no steps left: start={start} >= episode rows {L}")
    X = ctx[:, steps].reshape(-1, Cc)
    t = np.asarray(targets, np.float64)
    if t.ndim == 2:
        t = np.repeat(t[:, None], steps.size, 1)
    else:
        t = t[:, steps]
    y = t.reshape(E * steps.size, -1)
    ep = np.repeat(np.arange(E), steps.size)
    return X, y, ep


def window_means(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of x over each step's causal window: x (E, L[, F]) -> float64 of the same shape,
    out[e, t] = mean of x[e, max(0, t - window + 1) .. t] (each row one episode)."""
    x = np.asarray(x, np.float64)
    c = np.concatenate([np.zeros_like(x[:, :1]), np.cumsum(x, 1)], 1)
    t = np.arange(x.shape[1])
    lo = np.maximum(t - window + 1, 0)
    n = (t - lo + 1).reshape((1, -1) + (1,) * (x.ndim - 2))
    return (c[:, t + 1] - c[:, lo]) / n


# ------------------------------------------------------------------------------- probing

def window_probe(agent, params, episodes: dict, train, test, stride: int = 1) -> np.ndarray:
    """Per-window R^2 (F,) of a ridge probe from g_phi's context to each true factor: fitted
    on the full windows (t >= K - 1) of the `train` episodes, scored on those of `test`."""
    ctx = episode_contexts(agent, params, episodes)
    K = agent.config.context.window
    X, y, ep = step_samples(ctx, episodes["factors"], start=K - 1, stride=stride)
    return linear_probe_r2(X[train[ep]], y[train[ep]], X[test[ep]], y[test[ep]])


def linear_probe_r2(X_train, y_train, X_test, y_test, alpha: float = 1e-3) -> np.ndarray:
    """R^2 on the test set of a ridge regression with intercept, fitted on the train set.

    Inputs are standardised with the train statistics (constant features are left at zero);
    `alpha` is the ridge penalty per training sample on the standardised weights (0: least
    squares). R^2 = 1 - SSE / SST per target with SST about the test mean (as sklearn's
    r2_score); 1 is perfect, 0 is no better than the test mean, negative is worse.
    X: (N, D); y: (N,) or (N, F). Returns float64 (F,) ((1,) for 1-D y).
    """
    Xtr = np.asarray(X_train, np.float64)
    Xte = np.asarray(X_test, np.float64)
    ytr = np.asarray(y_train, np.float64)
    yte = np.asarray(y_test, np.float64)
    ytr = ytr[:, None] if ytr.ndim == 1 else ytr
    yte = yte[:, None] if yte.ndim == 1 else yte
    if Xtr.ndim != 2 or Xte.ndim != 2 or Xtr.shape[1] != Xte.shape[1]:
        raise ValueError(f"X_train {Xtr.shape} and X_test {Xte.shape} must be (N, D) alike")
    if len(Xtr) != len(ytr) or len(Xte) != len(yte) or ytr.shape[1] != yte.shape[1]:
        raise ValueError("X and y disagree in length or number of targets")
    if not (np.isfinite(Xtr).all() and np.isfinite(Xte).all()):
        raise ValueError("X contains non-finite values")
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd = np.where(sd > 1e-12 * max(1.0, float(np.abs(Xtr).max(initial=0.0))), sd, np.inf)
    Ztr, Zte = (Xtr - mu) / sd, (Xte - mu) / sd
    ym = ytr.mean(0)
    n, d = Ztr.shape
    gram = Ztr.T @ Ztr + alpha * n * np.eye(d)
    W = np.linalg.lstsq(gram, Ztr.T @ (ytr - ym), rcond=None)[0]
    pred = Zte @ W + ym
    sse = ((yte - pred) ** 2).sum(0)
    sst = ((yte - yte.mean(0)) ** 2).sum(0)
    return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)


def variance_shares(ctx, context_id) -> dict:
    """Law-of-total-variance split of per-step contexts, summed over the context dims.

    ctx: (E, n, Cc) contexts of n steps per episode; context_id: (E,) the episode's context.
    Returns the shares (summing to 1) of the total variance that lie between the contexts'
    means (`context`), between the episodes of one context (`episode`) and over the steps
    of one episode (`time`), plus `total` (the summed variance). A context that encodes only
    the dynamics factors has `context` near 1; one that tracks the state has a large `time`.
    """
    c = np.asarray(ctx, np.float64)
    ids = np.asarray(context_id)
    if c.ndim != 3 or ids.shape != c.shape[:1]:
        raise ValueError(f"ctx must be (E, n, Cc) and context_id (E,); got {c.shape}, "
                         f"{ids.shape}")
    ep_mean = c.mean(1)  # (E, Cc)
    time = ((c - ep_mean[:, None]) ** 2).mean(1)  # (E, Cc)
    groups = {i: np.flatnonzero(ids == i) for i in np.unique(ids)}
    ctx_mean = np.zeros_like(ep_mean)
    for rows in groups.values():
        ctx_mean[rows] = ep_mean[rows].mean(0)
    grand = ep_mean.mean(0)
    parts = dict(context=((ctx_mean - grand) ** 2).mean(0).sum(),
                 episode=((ep_mean - ctx_mean) ** 2).mean(0).sum(), time=time.mean(0).sum())
    total = sum(parts.values())
    out = {k: float(v / total) if total > 0 else float("nan") for k, v in parts.items()}
    out["total"] = float(total)
    return out


def tsne_plot(C, labels, path, names: Sequence[str] | None = None, perplexity: float = 30.0,
              seed: int = 0, max_points: int = 2000, title: str | None = None) -> np.ndarray:
    """2-D t-SNE of contexts C (N, Cc), one panel per label column coloured by its value.

    labels: (N,) or (N, F) true context values; names: F panel titles. At most `max_points`
    points (a fixed random subset) are embedded. Writes a PNG to `path`; returns the
    embedding (n, 2) of the plotted points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    C = np.asarray(C, np.float64)
    lab = np.asarray(labels, np.float64)
    lab = lab[:, None] if lab.ndim == 1 else lab
    if len(C) != len(lab):
        raise ValueError(f"{len(C)} contexts but {len(lab)} labels")
    F = lab.shape[1]
    names = list(names) if names is not None else [f"factor {i}" for i in range(F)]
    rng = np.random.default_rng(seed)
    if len(C) > max_points:
        keep = np.sort(rng.choice(len(C), max_points, replace=False))
        C, lab = C[keep], lab[keep]
    perp = float(min(perplexity, max(2.0, (len(C) - 1) / 3.0)))
    emb = TSNE(2, perplexity=perp, init="pca", random_state=seed).fit_transform(C)
    fig, axes = plt.subplots(1, F, figsize=(4.6 * F, 4.0), squeeze=False)
    for i, ax in enumerate(axes[0]):
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=lab[:, i], cmap="viridis", s=6, alpha=0.8,
                        linewidths=0)
        fig.colorbar(sc, ax=ax, label=names[i])
        ax.set_title(f"coloured by {names[i]}")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return emb

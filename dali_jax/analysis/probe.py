"""Context analysis: inferred contexts of episodes, linear probes, variance shares, t-SNE.

Pure functions (numpy in, numpy out) used by ``python -m dali_jax.probe`` and the tests, on the
episode dicts of ``dali_jax.analysis.episodes``:

* ``episode_contexts(agent, params, episodes)``: g_phi's context at every step, from the causal,
  episode-bounded windows used in training and acting.
* ``step_samples``: (context, factor) pairs of the steps whose window is full.
* ``linear_probe_r2(X_train, y_train, X_test, y_test)``: per-target R^2 of a ridge probe.
* ``variance_shares(ctx, context_id)``: how much of the context's variance is between
  contexts, between episodes of one context, and within an episode (over time).
* ``tsne_plot(C, labels, path)``: 2-D t-SNE of contexts coloured by the true factors.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["episode_contexts", "step_samples", "window_probe", "window_means",
           "linear_probe_r2", "variance_shares", "tsne_plot"]


# --------------------------------------------------------------------------- inference

_INFER = weakref.WeakKeyDictionary()


def _infer_fn(agent):
    """Jitted (params, batch (N, K + T, ...)) -> (N, T, Cc): the context of the last T steps
    of each sequence, the first K steps being their history."""
    from dali_jax.models import context_encoder as CE

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
            tok = CE.tokens(obs_vec, prev)
            idx = CE.window_indices(is_first, K)[:, K:]
            return agent.ctx_encoder.apply({"params": params["context"]["encoder"]}, tok, idx,
                                           method=CE.ContextEncoder.chunk)

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
    from sklearn.manifold import TSNE

    from dali_jax.analysis.plots import pyplot, save

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
    fig, axes = pyplot().subplots(1, F, figsize=(4.6 * F, 4.0), squeeze=False)
    for i, ax in enumerate(axes[0]):
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=lab[:, i], cmap="viridis", s=6, alpha=0.8,
                        linewidths=0)
        fig.colorbar(sc, ax=ax, label=names[i])
        ax.set_title(f"coloured by {names[i]}")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    save(fig, path, dpi=110)
    return emb

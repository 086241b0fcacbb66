"""Counterfactual imagination: what the world model imagines when one context dimension moves.

::

    python -m dali_jax.counterfactual --logdir RUN [--dim auto|K] [--scale 3] [--out DIR]
        [--windows 64] [--horizon 64] [--episodes 4] [--episode-length L] [--seed S]
        [--actions auto|zero|recorded] [--check-scales=-3,-2,-1,0,1,2,3] [--frames 16]
        [--sigma-stride N] [--all-dims] [--fast] [--task TASK] [--step N]

Procedure (docs/protocol.md, "Counterfactual imagination"):

1. At the task's default context, ``--episodes`` episodes are collected with the trained policy
   (``--mode``, sampled actions by default), recording observations, actions and the acting
   RSSM state.
2. Context windows of K = ``config.context.window`` acting tokens [o_k, a_{k-1}] are cut from
   the episodes. For DALI runs c = g_phi(window); for cRSSM runs the "context" is the
   ground-truth normalised context observation (constant at the default context).
3. sigma_d: the std of context dimension d over all windows (stride ``--sigma-stride``) of all
   episodes. For cRSSM runs (where that std is 0) sigma_d is the std of the normalised context
   over the run's training context set, or over the 84-context evaluation grid when the
   training set holds a single context; ``summary.json`` names the source.
4. For ``--windows`` windows (start s drawn at random): the posterior at the window's first step
   s is recomputed from the acting state at s-1, the observation o_s and c (so shallow
   variants, where c only enters the posterior, and cRSSM-S, where it enters the encoder, see
   the perturbation too); from it the model imagines ``--horizon`` steps open loop (zero
   actions for Ball-in-Cup, the recorded actions a_s.. for Walker; ``--actions`` overrides)
   and decodes them (baseline). For every context dimension d, the same is done with
   c + scale * sigma_d * e_d and the SAME random key (counterfactual), so with ``--scale 0``
   the counterfactual equals the baseline exactly.
5. Influence of dimension d: a classifier ensemble (RBF SVC; MLP 1024x1024 with Adam for 200
   epochs; AdaBoost with 200 estimators; ``--fast``: MLP 64x64 for 50 epochs, AdaBoost 25)
   separates baseline from counterfactual imagined trajectories (features: flattened decoded
   observation vectors; pixels: decoded frames average-pooled to 8x8x3, flattened).
   Out-of-fold scores from 5-fold CV (pairs of one window kept in one fold) of each classifier
   are rank-normalised and averaged; the ROC-AUC of that ensemble score, with a 95% CI from
   500 bootstrap resamples of the windows, is the influence. ``--dim auto`` shows the
   highest-AUC dimension.
6. Ball-in-Cup (featurized runs) physical check: zero actions, the chosen dimension shifted by
   each of ``--check-scales`` sigmas; the imagined ball's vertical acceleration is the second
   difference of the decoded ball z (observation index 3: the 8-dim observation is cup x, cup
   z, ball x, ball z, then their velocities) over the 0.02 s control step, averaged over the
   horizon. Reported: Spearman's rho between the shift and the acceleration over all
   (window, shift) pairs, the mean acceleration per shift, and rho for every dimension.

Outputs (``--out``, default ``RUN/counterfactual``) for the shown dimension d (every dimension
with ``--all-dims``):

* ``strip_dim{d}.png``: rows baseline / counterfactual / difference. Pixels: ``--frames`` frames
  of the shown window side by side, 64 px each, rows stacked without gaps, difference row
  (baseline - counterfactual + 1) / 2 (uniform grey 0.5 when they agree). Features: three
  heatmaps (observation dim x time) with the difference baseline - counterfactual.
* ``cf_dim{d}.gif`` (pixels): per step [baseline | counterfactual | difference], 2x upscaled.
* ``timeseries_dim{d}.png`` (features): every decoded observation dimension over time,
  baseline vs counterfactual.
* ``decoded_dim{d}.npz``: ``baseline``, ``counterfactual`` (H, ...) float32 decoded arrays of
  the shown window, ``difference`` = baseline - counterfactual, ``context``, ``delta``.
* ``influence_auc.png`` (AUC per dimension with CIs), ``physical_check.png`` (Ball-in-Cup
  features) and ``summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["CounterfactualError", "Episodes", "collect_episodes", "influence_auc",
           "auc_score", "run_counterfactual", "main", "BALL_Z_INDEX"]

BALL_Z_INDEX = 3  # ball_in_cup obs = [cup x, cup z, ball x, ball z, 4 velocities] (qpos, qvel)
CONTROL_DT = {"ball_in_cup": 0.02, "walker": 0.025}
DEFAULT_CHECK_SCALES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
FAST_ADABOOST = 25
POOL = 8  # pixel trajectories are average-pooled to POOL x POOL x 3 for the classifiers


class CounterfactualError(ValueError):
    """Bad input to the counterfactual tool (message says what and the valid values)."""


# ----------------------------------------------------------------------------- collection
@dataclasses.dataclass
class Episodes:
    """Episodes collected with the policy; arrays (E, T, ...) with T = L + 1 observations.

    obs: observation keys of the spec (+ nothing else); action: action taken at t (zero at the
    last step); prev_action: a_{t-1} (zero at t = 0); is_first: (E, T) bool; state: the acting
    carry's RSSM state before step t (the posterior at t - 1)."""

    obs: dict
    action: np.ndarray
    prev_action: np.ndarray
    is_first: np.ndarray
    state: dict

    @property
    def length(self) -> int:
        return int(self.action.shape[1])


def collect_episodes(agent, params, task: str, obs_mode: str, context: dict, episodes: int,
                     episode_length: int, seed: int, mode: str = "sample") -> Episodes:
    """One episode per env at ``context`` with the agent's policy (envs in this process)."""
    import jax

    from dali_jax.envs.dmc import make_env
    from dali_jax.envs.vector import VectorEnv

    fns = [functools.partial(make_env, task, {0: dict(context)}, obs_mode=obs_mode,
                             seed=seed * 100003 + 7919 * i, time_limit=episode_length)
           for i in range(episodes)]
    venv = VectorEnv(fns, parallel=False)
    keys = list(agent.spec.obs)
    rec = {k: [] for k in keys}
    acts, prevs, firsts, states = [], [], [], []
    key = jax.random.PRNGKey(seed)
    try:
        obs = venv.reset()
        carry = agent.initial_carry(params, episodes)
        done = np.zeros(episodes, bool)
        while True:
            for k in keys:
                rec[k].append(np.asarray(obs[k]))
            first = np.asarray(obs["is_first"], bool)
            firsts.append(first)
            prevs.append(np.asarray(carry["prev_action"], np.float32) * (~first)[:, None])
            states.append(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32),
                                                 carry["state"]))
            key, sub = jax.random.split(key)
            action, carry = agent.policy_step(params, carry, obs, sub, mode=mode)
            action = np.asarray(action, np.float32)
            done |= np.asarray(obs["is_last"], bool)
            if done.all():
                acts.append(np.zeros_like(action))
                break
            acts.append(action)
            obs, _ = venv.step(action)
            if np.asarray(obs["is_first"], bool).any():
                raise CounterfactualError("an episode ended early (physics instability?) "
                                          "while collecting; try another --seed")
    finally:
        venv.close()
    sw = lambda xs: np.swapaxes(np.stack(xs), 0, 1)
    state = jax.tree_util.tree_map(lambda *xs: sw(list(xs)), *states)
    return Episodes(obs={k: sw(v) for k, v in rec.items()}, action=sw(acts),
                    prev_action=sw(prevs), is_first=sw(firsts), state=state)


# ----------------------------------------------------------------------------- AUC
def auc_score(scores, labels) -> float:
    """ROC-AUC (Mann-Whitney, ties count 1/2); labels 0/1. nan if one class is absent."""
    from scipy.stats import rankdata

    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _classifiers(fast: bool, seed: int):
    from sklearn.ensemble import AdaBoostClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    mlp = (64, 64) if fast else (1024, 1024)
    return {
        "svc_rbf": make_pipeline(StandardScaler(), SVC(kernel="rbf", gamma="scale")),
        "mlp": make_pipeline(StandardScaler(), MLPClassifier(
            hidden_layer_sizes=mlp, max_iter=50 if fast else 200, random_state=seed)),
        "adaboost": AdaBoostClassifier(n_estimators=FAST_ADABOOST if fast else 200,
                                       random_state=seed),
    }


def _oof_scores(clf, X, y, groups, folds: int, seed: int) -> np.ndarray:
    from sklearn.base import clone
    from sklearn.model_selection import GroupKFold

    out = np.zeros(len(y), np.float64)
    for tr, te in GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, groups):
        m = clone(clf).fit(X[tr], y[tr])
        out[te] = (m.predict_proba(X[te])[:, 1] if hasattr(m, "predict_proba")
                   else m.decision_function(X[te]))
    return out


def influence_auc(X0, X1, fast: bool = False, seed: int = 0, folds: int = 5,
                  n_boot: int = 500, confidence: float = 0.95) -> dict:
    """How well an ensemble separates trajectories X0 (N, F) from their counterfactuals X1.

    Rows i of X0 and X1 come from the same window and stay in one CV fold. -> dict(auc,
    ci_low, ci_high, classifiers={name: auc}, n_pairs)."""
    from scipy.stats import rankdata

    X0, X1 = np.asarray(X0, np.float64), np.asarray(X1, np.float64)
    n = len(X0)
    if n < folds:
        raise CounterfactualError(f"{folds}-fold CV needs at least {folds} windows; got {n}")
    if np.array_equal(X0, X1):  # nothing to separate (e.g. scale 0)
        names = list(_classifiers(True, seed))
        return dict(auc=0.5, ci_low=0.5, ci_high=0.5, classifiers={k: 0.5 for k in names},
                    n_pairs=n, identical=True)
    X = np.concatenate([X0, X1])
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    groups = np.r_[np.arange(n), np.arange(n)]
    per, ranks = {}, []
    from threadpoolctl import threadpool_limits

    # Small problems: one BLAS thread (oversubscribed BLAS threads slow tiny MLP fits 10x).
    limit = 1 if fast or X.size < 2_000_000 else None
    with warnings.catch_warnings(), threadpool_limits(limits=limit):
        warnings.simplefilter("ignore")  # MLP convergence warnings on tiny data
        for name, clf in _classifiers(fast, seed).items():
            s = _oof_scores(clf, X, y, groups, folds, seed)
            per[name] = auc_score(s, y)
            ranks.append(rankdata(s) / len(s))
    ens = np.mean(ranks, axis=0)
    auc = auc_score(ens, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        g = rng.integers(0, n, n)
        idx = np.r_[g, g + n]
        boots.append(auc_score(ens[idx], y[idx]))
    boots = np.asarray(boots)
    a = (1 - confidence) / 2
    lo, hi = np.nanquantile(boots, [a, 1 - a])
    return dict(auc=float(auc), ci_low=float(lo), ci_high=float(hi), classifiers=per,
                n_pairs=n, identical=False)


# ----------------------------------------------------------------------------- helpers
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _pool(images) -> np.ndarray:
    """(..., 64, 64, 3) -> (..., POOL, POOL, 3) block means."""
    x = np.asarray(images, np.float32)
    h, w, c = x.shape[-3:]
    x = x.reshape(x.shape[:-3] + (POOL, h // POOL, POOL, w // POOL, c))
    return x.mean(axis=(-4, -2))


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise CounterfactualError(f"--check-scales must be comma-separated numbers; "
                                  f"got {text!r}") from None
    if len(set(out)) < 2:
        raise CounterfactualError("--check-scales needs at least two distinct values")
    return out


def _check_int(name, value, lo=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise CounterfactualError(f"{name} must be an integer >= {lo}; got {value!r}")


def _load(logdir, step, task):
    from dali_jax.training.load import load_run_or_raise
    return load_run_or_raise(logdir, CounterfactualError, step=step, task=task)


def _check_run(logdir, task, dim) -> int:
    """Config-level checks (task, method with a context, dim range). -> context dims."""
    from dali_jax.envs import contexts as C
    from dali_jax.methods import config_switches
    from dali_jax.training.load import load_config_or_raise

    cfg = load_config_or_raise(logdir, CounterfactualError)
    if task is not None and cfg.task != task:
        raise CounterfactualError(f"{logdir} is a {cfg.task} run, not {task}")
    try:
        sw = config_switches(cfg)
    except (ValueError, AttributeError, KeyError) as e:
        raise CounterfactualError(f"{logdir}: {e}") from None
    if sw.source == "none":
        raise CounterfactualError(
            f"{logdir}: method {cfg.method!r} has no context (the world model never sees c), "
            f"so there is nothing to perturb; use a dali_* or crssm_* run")
    Cc = int(cfg.context.dim) if sw.source == "inferred" else len(C.FACTORS[cfg.task])
    if dim is not None and not 0 <= dim < Cc:
        raise CounterfactualError(f"--dim {dim} is out of range: the context of this "
                                  f"{cfg.method} run has {Cc} dimensions, valid 0..{Cc - 1} "
                                  f"(or 'auto')")
    return Cc


def _gt_sigma(config) -> tuple[np.ndarray, str]:
    from dali_jax.envs import contexts as C
    from dali_jax.training.train import training_contexts

    vals = np.stack([C.normalize_context(config.task, v)
                     for v in training_contexts(config).values()])
    sd = vals.std(axis=0)
    if np.all(sd > 0):
        return sd, "std of the normalised context over the training context set"
    grid = np.stack([C.normalize_context(config.task, g.values)
                     for g in C.evaluation_grid(config.task)])
    return grid.std(axis=0), ("std of the normalised context over the evaluation grid (the "
                              "training set holds a single context)")


# ----------------------------------------------------------------------------- writers
def _write_pixel_outputs(out: Path, d: int, base, cf, frames: int, fps: float) -> list[str]:
    from PIL import Image

    H = base.shape[0]
    diff = (base - cf + 1.0) / 2.0
    pick = np.unique(np.linspace(0, H - 1, min(frames, H)).round().astype(int))
    rows = [np.concatenate(list(_to_uint8(x[pick])), axis=1) for x in (base, cf, diff)]
    strip = out / f"strip_dim{d}.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(strip)
    gif_frames = []
    for t in range(H):
        f = np.concatenate([_to_uint8(base[t]), _to_uint8(cf[t]), _to_uint8(diff[t])], axis=1)
        f = f.repeat(2, axis=0).repeat(2, axis=1)
        gif_frames.append(Image.fromarray(f))
    gif = out / f"cf_dim{d}.gif"
    gif_frames[0].save(gif, save_all=True, append_images=gif_frames[1:],
                       duration=max(1, int(round(1000 / fps))), loop=0)
    return [strip.name, gif.name]


def _write_feature_outputs(out: Path, d: int, base, cf, scale: float, sigma: float,
                           labels: Sequence[str]) -> list[str]:
    plt = _plt()
    H, Do = base.shape
    diff = base - cf
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.12 * H + 2), 2.0 + 0.35 * Do * 3 / 2),
                             sharex=True)
    vmin, vmax = float(min(base.min(), cf.min())), float(max(base.max(), cf.max()))
    lim = float(np.abs(diff).max()) or 1e-12
    for ax, arr, title, kw in (
            (axes[0], base, "baseline", dict(vmin=vmin, vmax=vmax, cmap="viridis")),
            (axes[1], cf, f"counterfactual (dim {d} + {scale:g} sigma = {scale * sigma:+.3g})",
             dict(vmin=vmin, vmax=vmax, cmap="viridis")),
            (axes[2], diff, f"difference baseline - counterfactual (max |diff| "
                            f"{float(np.abs(diff).max()):.3g})",
             dict(vmin=-lim, vmax=lim, cmap="RdBu_r"))):
        im = ax.imshow(arr.T, aspect="auto", interpolation="nearest", **kw)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(Do))
        ax.set_yticklabels(labels, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.03)
    axes[2].set_xlabel("imagined step")
    fig.tight_layout()
    strip = out / f"strip_dim{d}.png"
    fig.savefig(strip, dpi=100)
    plt.close(fig)

    cols = min(4, Do)
    rws = int(np.ceil(Do / cols))
    fig, axes = plt.subplots(rws, cols, figsize=(3.2 * cols, 2.2 * rws), squeeze=False)
    t = np.arange(1, H + 1)
    for i in range(rws * cols):
        ax = axes[i // cols][i % cols]
        if i >= Do:
            ax.axis("off")
            continue
        ax.plot(t, base[:, i], label="baseline", lw=1.5)
        ax.plot(t, cf[:, i], "--", label="counterfactual", lw=1.5)
        ax.set_title(labels[i], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"context dim {d} shifted by {scale:g} sigma", fontsize=9)
    fig.tight_layout()
    ts = out / f"timeseries_dim{d}.png"
    fig.savefig(ts, dpi=100)
    plt.close(fig)
    return [strip.name, ts.name]


def _plot_auc(path: Path, aucs: Sequence[dict], chosen: int):
    plt = _plt()
    n = len(aucs)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * n, 3.0))
    x = np.arange(n)
    est = np.array([a["auc"] for a in aucs])
    err = np.array([[a["auc"] - a["ci_low"] for a in aucs], [a["ci_high"] - a["auc"]
                                                              for a in aucs]])
    ax.bar(x, est, yerr=np.maximum(err, 0), capsize=3,
           color=["tab:red" if i == chosen else "tab:blue" for i in range(n)])
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_ylim(0.0, 1.05)
    ax.set_xticks(x)
    ax.set_xlabel("context dimension")
    ax.set_ylabel("influence ROC-AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_check(path: Path, scales, accel, dim: int, rho: float):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    s = np.asarray(scales)
    for row in accel:
        ax.plot(s, row, color="0.7", lw=0.6)
    ax.plot(s, accel.mean(0), "o-", color="tab:red", label="mean over windows")
    ax.set_xlabel(f"shift of context dim {dim} (sigma)")
    ax.set_ylabel("imagined ball z acceleration (m/s^2)")
    ax.set_title(f"Spearman rho = {rho:.3f}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main routine
def run_counterfactual(logdir: str, dim="auto", scale: float = 3.0, out: str | None = None,
                       windows: int = 64, horizon: int = 64, episodes: int = 4,
                       episode_length: int | None = None, seed: int = 0, mode: str = "sample",
                       actions: str = "auto", check_scales=DEFAULT_CHECK_SCALES,
                       frames: int = 16, sigma_stride: int | None = None,
                       all_dims: bool = False, fast: bool = False, task: str | None = None,
                       step: int | None = None, n_boot: int = 500,
                       verbose: bool = False) -> dict:
    """Runs the whole analysis, writes the files into ``out`` and returns the summary dict."""
    import jax

    from dali_jax.envs import contexts as C

    t_start = time.time()
    log = (lambda *a: print(*a, file=sys.stderr)) if verbose else (lambda *a: None)
    dim_auto, dim, check_scales = _validate_options(
        dim, scale, windows, horizon, episodes, frames, sigma_stride, episode_length, mode,
        actions, check_scales)
    # Cheap checks on the run's config before loading the checkpoint.
    Cc = _check_run(logdir, task, None if dim_auto else dim)
    run = _load(logdir, step, task)
    cfg, agent, params = run.config, run.agent, run.params
    if int(agent.ctx_dim) != Cc:
        raise CounterfactualError(f"{logdir}: context has {agent.ctx_dim} dimensions, the "
                                  f"config says {Cc}")
    task_name, pixels = cfg.task, bool(agent.image_keys)
    K, H = int(cfg.context.window), int(horizon)
    L = int(cfg.run.episode_length if episode_length is None else episode_length)
    act_kind = actions if actions != "auto" else ("zero" if task_name == "ball_in_cup"
                                                  else "recorded")
    s_max = _last_start(agent, K, H, L, act_kind)
    out_dir = Path(out) if out else Path(logdir) / "counterfactual"
    out_dir.mkdir(parents=True, exist_ok=True)
    default = {f: float(C.DEFAULTS[task_name][f]) for f in C.FACTORS[task_name]}

    # 1. episodes at the default context
    t0 = time.time()
    ep = collect_episodes(agent, params, task_name, cfg.obs, default, episodes, L, seed, mode)
    log(f"collected {episodes} episodes of {L} steps in {time.time() - t0:.1f} s")
    E = ep.is_first.shape[0]
    # 2. the context of a window start (inferred from tokens, or the true one)
    contexts_of = _context_fn(agent, params, ep, K)
    # 3. sigma over windows
    stride = sigma_stride or max(1, K // 8)
    all_starts = [(e, s) for e in range(E) for s in range(0, s_max + 1, stride)]
    c_all = contexts_of(all_starts)
    if agent.inferred:
        sigma = c_all.std(axis=0)
        sigma_source = (f"std over {len(all_starts)} windows (stride {stride}) of {E} "
                        f"episodes at the default context")
    else:
        sigma, sigma_source = _gt_sigma(cfg)
    sigma = np.asarray(sigma, np.float32)
    # 4. chosen windows and imagination under shifted contexts
    picks, first, act_seq = _pick_windows(agent, ep, s_max, windows, H, act_kind, seed)
    ctx0 = contexts_of(picks)  # (N, Cc)
    imagine = _imaginer(agent, params, first, jax.random.PRNGKey(seed + 1))
    t0 = time.time()
    base, per_dim, aucs = _influence(agent, imagine, act_seq, ctx0, sigma, scale, fast, seed,
                                     n_boot, log)
    chosen = int(np.argmax([a["auc"] for a in aucs])) if dim_auto else int(dim)
    log(f"imagination and classifiers in {time.time() - t0:.1f} s; shown dim {chosen}")
    # 5. images
    files = _write_outputs(agent, task_name, out_dir, base, per_dim,
                           range(Cc) if all_dims else [chosen], ctx0, picks, scale, sigma, frames)
    _plot_auc(out_dir / "influence_auc.png", aucs, chosen)
    files.append("influence_auc.png")
    # 6. physical check (Ball-in-Cup, featurized)
    check = None
    if task_name == "ball_in_cup" and not pixels and "obs" in agent.vector_keys and H >= 3:
        check = _physical_check(imagine, ctx0, sigma, chosen, check_scales, len(picks), H,
                                agent.spec.action_dim, CONTROL_DT[task_name])
        _plot_check(out_dir / "physical_check.png", np.asarray(check_scales, np.float64),
                    check.pop("_accelerations"), chosen, check["spearman_rho"])
        files.append("physical_check.png")

    summary = dict(
        logdir=str(logdir), task=task_name, method=cfg.method, obs=cfg.obs,
        setting=cfg.context_setting, seed=int(cfg.seed), checkpoint_step=int(run.step),
        context_source=agent.switches.source, context_dims=Cc, window=K, horizon=H,
        episodes=E, episode_length=L, windows=len(picks), scale=float(scale),
        dim=chosen, dim_mode="auto" if dim_auto else "given", actions=act_kind,
        default_context=default, sigma=sigma.tolist(), sigma_source=sigma_source,
        zero_sigma_dims=[int(i) for i in np.flatnonzero(sigma <= 0)],
        context_mean=c_all.mean(0).tolist(),
        shown_window=dict(episode=int(picks[0][0]), start=int(picks[0][1]),
                          context=ctx0[0].tolist()),
        influence=dict(
            auc=[a["auc"] for a in aucs], ci_low=[a["ci_low"] for a in aucs],
            ci_high=[a["ci_high"] for a in aucs],
            per_classifier=[a["classifiers"] for a in aucs],
            classifiers=dict(svc="RBF SVC", mlp=(64, 64) if fast else (1024, 1024),
                             adaboost=FAST_ADABOOST if fast else 200),
            folds=5, bootstrap=n_boot, features="pooled 8x8x3 frames" if pixels
            else "decoded observation vectors", fast=bool(fast)),
        physical_check=check, seed_analysis=int(seed), files=sorted(set(files)),
        wall_s=time.time() - t_start)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _validate_options(dim, scale, windows, horizon, episodes, frames, sigma_stride,
                      episode_length, mode, actions, check_scales):
    """CounterfactualError for a bad option. -> (dim_auto, dim, check_scales tuple)."""
    if not isinstance(scale, (int, float)) or not np.isfinite(scale):
        raise CounterfactualError(f"--scale must be a finite number; got {scale!r}")
    for name, v in (("--windows", windows), ("--horizon", horizon), ("--episodes", episodes),
                    ("--frames", frames)):
        _check_int(name, v)
    if sigma_stride is not None:
        _check_int("--sigma-stride", sigma_stride)
    if episode_length is not None:
        _check_int("--episode-length", episode_length, lo=2)
    if mode not in ("sample", "mode"):
        raise CounterfactualError(f"--mode must be 'sample' or 'mode'; got {mode!r}")
    if actions not in ("auto", "zero", "recorded"):
        raise CounterfactualError(f"--actions must be auto, zero or recorded; got {actions!r}")
    if windows < 5:
        raise CounterfactualError(f"--windows must be >= 5 (5-fold CV of the influence "
                                  f"classifiers); got {windows}")
    dim_auto = str(dim) == "auto"
    if not dim_auto:
        try:
            dim = int(dim)
        except (TypeError, ValueError):
            raise CounterfactualError(f"--dim must be 'auto' or an integer; got {dim!r}") \
                from None
    return dim_auto, dim, tuple(float(s) for s in check_scales)


def _last_start(agent, K, H, L, act_kind) -> int:
    """The last window start that leaves a full window (and H recorded actions)."""
    nobs = L + 1
    s_max = nobs - K if agent.inferred else nobs - 1
    if act_kind == "recorded":
        s_max = min(s_max, L - H)
    if s_max < 0:
        raise CounterfactualError(
            f"episodes of {L} steps are too short for a window of {K} steps"
            + (f" and {H} recorded actions" if act_kind == "recorded" else "")
            + "; raise --episode-length or lower --horizon")
    return s_max


def _context_fn(agent, params, ep, K):
    """-> contexts_of([(episode, start)]) -> (M, Cc): g_phi over the K tokens from each start
    (inferred methods) or the env's true context there."""
    import jax
    import jax.numpy as jnp

    from dali_jax.models import context as CM

    if not agent.inferred:
        return lambda starts: np.stack([ep.obs["context"][e, s]
                                        for e, s in starts]).astype(np.float32)
    enc = jax.jit(lambda p, o: agent.encoder.apply({"params": p["encoder"]}, o))
    embed = np.concatenate([  # one episode at a time (one compiled shape)
        np.asarray(enc(params, {k: jnp.asarray(v[e:e + 1]) for k, v in ep.obs.items()}),
                   np.float32) for e in range(ep.is_first.shape[0])])
    tok_obs = np.asarray(agent.token_obs(ep.obs, jnp.asarray(embed)), np.float32)
    toks = np.asarray(CM.tokens(tok_obs, ep.prev_action), np.float32)  # (E, T, Din)
    infer = jax.jit(agent.infer_context)

    def contexts_of(starts):
        outs = []
        for i in range(0, len(starts), 512):
            w = np.stack([toks[e, s:s + K] for e, s in starts[i:i + 512]])
            outs.append(np.asarray(infer(params, jnp.asarray(w)), np.float32))
        return np.concatenate(outs)
    return contexts_of


def _pick_windows(agent, ep, s_max, windows, H, act_kind, seed):
    """Random window starts, the filter step into each (state, previous action, observation)
    and the H actions imagined from it. -> (picks [(e, s)], first step dict, actions (N, H, A))."""
    import jax.numpy as jnp

    E = ep.is_first.shape[0]
    rng = np.random.default_rng(seed)
    pool = [(e, s) for e in range(E) for s in range(0, s_max + 1)]
    n_win = min(windows, len(pool))
    if n_win < 5:
        raise CounterfactualError(f"only {len(pool)} window start(s) fit in the episodes; "
                                  f"need >= 5 (more --episodes or a longer --episode-length)")
    picks = [pool[i] for i in rng.choice(len(pool), n_win, replace=False)]
    ei = np.array([e for e, _ in picks])
    si = np.array([s for _, s in picks])
    first = dict(
        prev_state={k: jnp.asarray(v[ei, si]) for k, v in ep.state.items()},
        prev_action=jnp.asarray(ep.prev_action[ei, si]),
        obs={k: jnp.asarray(v[ei, si]) for k, v in ep.obs.items()},
        is_first=jnp.asarray(ep.is_first[ei, si]))
    if act_kind == "zero":
        acts = np.zeros((n_win, H, agent.spec.action_dim), np.float32)
    else:
        acts = np.stack([ep.action[e, s:s + H] for e, s in picks]).astype(np.float32)
    return picks, first, jnp.asarray(acts)


def _imaginer(agent, params, first, key):
    """-> imagine(actions (N, H, A), ctx (N, Cc)) -> decoded dict of float32 (N, H, ...):
    open-loop imagination from the windows' filter step under a given context."""
    import jax
    import jax.numpy as jnp

    from dali_jax.analysis.imagination import imagine_open_loop

    gt_encoder = (agent.switches.source == "ground_truth"
                  and "context" in agent.enc_vector_keys)

    @jax.jit
    def run(p, fs, acts, ctx, key):
        o = dict(fs["obs"])
        if gt_encoder:  # cRSSM-S: the context is an encoder input
            o["context"] = ctx.astype(o["context"].dtype)
        emb = agent.encoder.apply({"params": p["encoder"]}, o)
        step0 = dict(prev_state=fs["prev_state"], prev_action=fs["prev_action"], embed=emb,
                     is_first=fs["is_first"])
        _, dec = imagine_open_loop(agent, p, None, acts, ctx, key, first_step=step0)
        return dec

    def imagine(acts, ctx):
        dec = run(params, first, acts, jnp.asarray(ctx, jnp.float32), key)
        return {k: np.asarray(v, np.float32) for k, v in dec.items()}
    return imagine


def _features(agent, dec):
    """Classifier features of decoded rollouts: pooled frames or observation vectors (N, F)."""
    if agent.image_keys:
        x = _pool(dec[agent.image_keys[0]])
    else:
        x = np.concatenate([dec[k] for k in agent.vector_keys], -1)
    return x.reshape(len(x), -1)


def _influence(agent, imagine, acts, ctx0, sigma, scale, fast, seed, n_boot, log):
    """Baseline rollouts and, per context dimension d, the rollouts under c + scale sigma_d
    e_d and the AUC of telling them apart. -> (baseline, {d: shown window, delta}, AUCs)."""
    base = imagine(acts, ctx0)
    base_feat = _features(agent, base)
    per_dim, aucs = {}, []
    for d in range(ctx0.shape[1]):
        delta = np.zeros(ctx0.shape[1], np.float32)
        delta[d] = scale * sigma[d]
        cf = imagine(acts, ctx0 + delta[None])
        per_dim[d] = dict(decoded={k: v[:1] for k, v in cf.items()}, delta=delta)  # window 0
        a = influence_auc(base_feat, _features(agent, cf), fast=fast, seed=seed, n_boot=n_boot)
        a["dim"] = d
        aucs.append(a)
        log(f"dim {d}: sigma {sigma[d]:.4g} AUC {a['auc']:.3f} "
            f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    return base, per_dim, aucs


def _write_outputs(agent, task_name, out_dir, base, per_dim, dims, ctx0, picks, scale, sigma,
                   frames) -> list:
    """Images (pixel strips and GIFs, or feature plots) and decoded_dim{d}.npz of the shown
    window for each of `dims`. -> file names."""
    files, obs_labels = [], []
    vec_keys = list(agent.vector_keys)
    if not agent.image_keys:
        for k in vec_keys:
            n = base[k].shape[-1]
            names = (["cup x", "cup z", "ball x", "ball z", "cup vx", "cup vz", "ball vx",
                      "ball vz"] if task_name == "ball_in_cup" and k == "obs" and n == 8
                     else [f"{k}[{i}]" for i in range(n)])
            obs_labels += names
    for d in dims:
        if agent.image_keys:
            key = agent.image_keys[0]
            b, c = base[key][0], per_dim[d]["decoded"][key][0]
            files += _write_pixel_outputs(out_dir, d, b, c, frames,
                                          fps=1.0 / CONTROL_DT.get(task_name, 0.05) / 5)
        else:
            b = np.concatenate([base[k][0] for k in vec_keys], -1)
            c = np.concatenate([per_dim[d]["decoded"][k][0] for k in vec_keys], -1)
            files += _write_feature_outputs(out_dir, d, b, c, scale, float(sigma[d]),
                                            obs_labels)
        npz = out_dir / f"decoded_dim{d}.npz"
        np.savez_compressed(npz, baseline=b, counterfactual=c, difference=b - c,
                            context=ctx0[0], delta=per_dim[d]["delta"],
                            window=np.array([picks[0][0], picks[0][1]]))
        files.append(npz.name)
    return files


def _physical_check(imagine, ctx0, sigma, chosen, check_scales, n_win, H, A, dt) -> dict:
    """Ball-in-Cup: Spearman rho between a context shift (scales x sigma of a dimension) and
    the decoded ball's vertical acceleration under zero actions, per dimension; the chosen
    dimension's accelerations (N, S) come back under "_accelerations"."""
    import jax.numpy as jnp
    from scipy.stats import spearmanr

    zero_acts = jnp.zeros((n_win, H, A), jnp.float32)
    scales_arr = np.asarray(check_scales, np.float64)

    def accel_for(d):
        rows = []
        for s in scales_arr:
            delta = np.zeros(ctx0.shape[1], np.float32)
            delta[d] = s * sigma[d]
            z = np.asarray(imagine(zero_acts, ctx0 + delta[None])["obs"],
                           np.float64)[..., BALL_Z_INDEX]  # (N, H)
            rows.append((np.diff(z, n=2, axis=1) / dt ** 2).mean(axis=1))
        return np.stack(rows, axis=1)  # (N, S)

    def rho_of(acc):
        x = np.broadcast_to(scales_arr[None], acc.shape).ravel()
        if np.ptp(acc) == 0:
            return float("nan"), float("nan")
        r = spearmanr(x, acc.ravel())
        return float(r.statistic), float(r.pvalue)

    per_rho, acc_chosen = {}, None
    for d in range(ctx0.shape[1]):
        acc = accel_for(d)
        per_rho[d] = rho_of(acc)[0]
        if d == chosen:
            acc_chosen = acc
    rho, p = rho_of(acc_chosen)
    means = acc_chosen.mean(0)
    rho_means = (float(spearmanr(scales_arr, means).statistic)
                 if np.ptp(means) > 0 else float("nan"))
    rhos = list(per_rho.values())
    return dict(
        dim=chosen, scales_sigma=scales_arr.tolist(),
        deltas=(scales_arr * float(sigma[chosen])).tolist(),
        mean_acceleration=means.tolist(), spearman_rho=rho, spearman_p=p,
        spearman_rho_of_means=rho_means, n_windows=n_win,
        spearman_rho_per_dim={str(k): v for k, v in per_rho.items()},
        gravity_aligned_dim=(None if all(np.isnan(rhos)) else int(np.nanargmax(np.abs(rhos)))),
        ball_z_index=BALL_Z_INDEX, control_dt=dt, actions="zero",
        note="acceleration = mean over the horizon of the second difference of the "
             "decoded ball z divided by dt^2; rho over all (window, shift) pairs",
        _accelerations=acc_chosen)


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dali_jax.counterfactual",
        description="Counterfactual imagination: perturb one context dimension, imagine open "
                    "loop, decode; influence AUC per dimension; Ball-in-Cup gravity check.")
    p.add_argument("--logdir", required=True, help="run directory")
    p.add_argument("--dim", default="auto", help="context dimension to show, or 'auto' "
                                                 "(highest influence AUC)")
    p.add_argument("--scale", type=float, default=3.0, help="shift in sigmas (default 3)")
    p.add_argument("--out", default=None, help="output directory (default RUN/counterfactual)")
    p.add_argument("--windows", type=int, default=64, help="windows (imagined trajectories)")
    p.add_argument("--horizon", type=int, default=64, help="imagined steps")
    p.add_argument("--episodes", type=int, default=4, help="episodes collected")
    p.add_argument("--episode-length", type=int, default=None,
                   help="steps per collected episode (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="sample", choices=("sample", "mode"),
                   help="policy actions while collecting")
    p.add_argument("--actions", default="auto", choices=("auto", "zero", "recorded"),
                   help="imagination actions (auto: zero for ball_in_cup, recorded for walker)")
    p.add_argument("--check-scales", default=",".join(f"{s:g}" for s in DEFAULT_CHECK_SCALES),
                   help="shifts (sigmas) of the Ball-in-Cup physical check")
    p.add_argument("--frames", type=int, default=16, help="frames in a pixel strip")
    p.add_argument("--sigma-stride", type=int, default=None,
                   help="stride of the windows sigma is computed over (default K // 8)")
    p.add_argument("--all-dims", action="store_true", help="images for every dimension")
    p.add_argument("--fast", action="store_true",
                   help="small classifiers (MLP 64x64, AdaBoost 25)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples of the AUC")
    p.add_argument("--task", default=None, help="expected task (error if the run differs)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a message on bad input)."""
    args = _parser().parse_args(argv)
    try:
        s = run_counterfactual(
            args.logdir, dim=args.dim, scale=args.scale, out=args.out, windows=args.windows,
            horizon=args.horizon, episodes=args.episodes, episode_length=args.episode_length,
            seed=args.seed, mode=args.mode, actions=args.actions,
            check_scales=_parse_scales(args.check_scales), frames=args.frames,
            sigma_stride=args.sigma_stride, all_dims=args.all_dims, fast=args.fast,
            task=args.task, step=args.step, n_boot=args.bootstrap, verbose=not args.quiet)
    except CounterfactualError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        inf = s["influence"]
        print(f"{s['task']} {s['method']} ({s['obs']}): context dims {s['context_dims']}, "
              f"shown dim {s['dim']} ({s['dim_mode']}), scale {s['scale']:g} sigma")
        for d, (a, lo, hi) in enumerate(zip(inf["auc"], inf["ci_low"], inf["ci_high"])):
            print(f"  dim {d}: sigma {s['sigma'][d]:.4g}  AUC {a:.3f} [{lo:.3f}, {hi:.3f}]")
        if s["physical_check"]:
            pc = s["physical_check"]
            print(f"  physical check (dim {pc['dim']}): Spearman rho(shift, ball z accel) = "
                  f"{pc['spearman_rho']:.3f} (p = {pc['spearman_p']:.3g}); most "
                  f"gravity-aligned dim: {pc['gravity_aligned_dim']}")
        out = Path(args.out) if args.out else Path(args.logdir) / "counterfactual"
        print(f"wrote {len(s['files'])} files and summary.json to {out}")
    return 0

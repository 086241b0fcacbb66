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
6. Ball-in-Cup (featurized runs) physical check (`dali_jax.analysis.physical_check`): from
   the filter step at ``--check-starts`` episode starts (the ball released, string slack),
   zero actions, the chosen dimension shifted by each of ``--check-scales`` sigmas; the
   imagined ball's free-fall acceleration is the slope of the decoded ball z velocity over
   the first ``--check-steps`` 0.02 s control steps, averaged over ``--check-samples``
   imagined trajectories per start. Reported: Spearman's rho
   between the shift and the acceleration over all (start, shift) pairs, the mean
   acceleration per shift, and rho for every dimension. The context swap
   (``physical_check.context_swap_check``): the same fall imagined from starts at five
   gravities (0.5 .. 1.5 x the default) under contexts inferred at each of them: c alone
   moves, the filter state alone moves, or both (``physical_check.context_swap`` in
   ``summary.json``).

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

Episodes, windows and imagination: ``cf_rollouts``; the classifiers: ``cf_influence``; the
figures: ``cf_figures`` (all in ``dali_jax.analysis``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dali_jax.analysis import physical_check as PC
from dali_jax.analysis.cf_figures import plot_auc, plot_check, write_outputs
from dali_jax.analysis.cf_influence import FAST_ADABOOST, influence_per_dim
from dali_jax.analysis.cf_rollouts import (CounterfactualError, collect_episodes, context_fn,
                                           drop_check, imaginer, pick_windows,
                                           swap_check)

__all__ = ["run_counterfactual", "main"]

DEFAULT_CHECK_SCALES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)


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
    from dali_jax.training.setup import training_contexts

    vals = np.stack([C.normalize_context(config.task, v)
                     for v in training_contexts(config).values()])
    sd = vals.std(axis=0)
    if np.all(sd > 0):
        return sd, "std of the normalised context over the training context set"
    grid = np.stack([C.normalize_context(config.task, g.values)
                     for g in C.evaluation_grid(config.task)])
    return grid.std(axis=0), ("std of the normalised context over the evaluation grid (the "
                              "training set holds a single context)")


def run_counterfactual(logdir: str, dim="auto", scale: float = 3.0, out: str | None = None,
                       windows: int = 64, horizon: int = 64, episodes: int = 4,
                       episode_length: int | None = None, seed: int = 0, mode: str = "sample",
                       actions: str = "auto", check_scales=DEFAULT_CHECK_SCALES,
                       check_steps: int = PC.DEFAULT_STEPS, check_starts: int = 16,
                       check_samples: int = PC.DEFAULT_SAMPLES, frames: int = 16, sigma_stride: int | None = None,
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
    _check_int("--check-steps", check_steps)
    _check_int("--check-starts", check_starts, lo=2)
    _check_int("--check-samples", check_samples)
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
    contexts_of = context_fn(agent, params, ep, K)
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
    picks, first, act_seq = pick_windows(agent, ep, s_max, windows, H, act_kind, seed)
    ctx0 = contexts_of(picks)  # (N, Cc)
    imagine = imaginer(agent, params, first, jax.random.PRNGKey(seed + 1))
    t0 = time.time()
    base, per_dim, aucs = influence_per_dim(agent, imagine, act_seq, ctx0, sigma, scale, fast,
                                            seed, n_boot, log)
    chosen = int(np.argmax([a["auc"] for a in aucs])) if dim_auto else int(dim)
    log(f"imagination and classifiers in {time.time() - t0:.1f} s; shown dim {chosen}")
    # 5. images
    files = write_outputs(agent, task_name, out_dir, base, per_dim,
                          range(Cc) if all_dims else [chosen], ctx0, picks, scale, sigma, frames)
    plot_auc(out_dir / "influence_auc.png", aucs, chosen)
    files.append("influence_auc.png")
    # 6. physical check (Ball-in-Cup, featurized)
    check = None
    if task_name == "ball_in_cup" and not pixels and "obs" in agent.vector_keys:
        check = drop_check(agent, params, cfg.obs, default, K, sigma, chosen, check_scales,
                           check_steps, check_starts, seed, mode, check_samples)
        check["context_swap"] = swap_check(agent, params, cfg.obs, default, K, check_steps,
                                           check_starts, seed, mode, check_samples)
        plot_check(out_dir / "physical_check.png", np.asarray(check_scales, np.float64),
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
    p.add_argument("--check-steps", type=int, default=PC.DEFAULT_STEPS,
                   help="imagined steps of free fall the check's velocity slope spans")
    p.add_argument("--check-starts", type=int, default=16,
                   help="episode starts the physical check imagines from")
    p.add_argument("--check-samples", type=int, default=PC.DEFAULT_SAMPLES,
                   help="imagined trajectories per start the check averages")
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
            check_scales=_parse_scales(args.check_scales), check_steps=args.check_steps,
            check_starts=args.check_starts, check_samples=args.check_samples, frames=args.frames,
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
            print(f"  physical check (dim {pc['dim']}): Spearman rho(shift, ball free-fall "
                  f"acceleration) = {pc['spearman_rho']:.3f} (p = {pc['spearman_p']:.3g}); most "
                  f"gravity-aligned dim: {pc['gravity_aligned_dim']}")
            r = pc["by_route"]
            print(f"    shift through the dynamics only: rho {r['dynamics']['spearman_rho']:.3f}; "
                  f"through the decoder only: rho {r['heads']['spearman_rho']:.3f}")
        out = Path(args.out) if args.out else Path(args.logdir) / "counterfactual"
        print(f"wrote {len(s['files'])} files and summary.json to {out}")
    return 0

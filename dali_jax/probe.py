"""Context analysis of a trained DALI run: linear probes and a t-SNE plot of g_phi's context.

    python -m dali_jax.probe --logdir RUN [--episodes N] [--grid G] [--length L]
        [--policy random|agent] [--out DIR]

Collects episodes (features or pixels, as the run) on G x G contexts over
the train ranges of the factors the run was trained on (`--contexts trained`, the default: a
single_0 run sees gravity varied with the string length at its default, so it is probed the
same way, G * G gravity values; a double_box run, or `--contexts both`, a G x G grid over both
factors; N episodes per context) with uniform random actions (`--policy random`, the
default) or with the run's own policy (`--policy agent`: the states the agent visits, e.g. a
Walker that stays up where random actions make it fall), infers the context at every step
with the run's g_phi (causal windows of K steps, as in training and acting), and fits a
ridge probe from the context to each true factor on the training episodes; R^2 is measured
on held-out episodes (the last `--test-per-context` episodes of every context).
Samples are the steps whose window is full (t >= K - 1, every `--stride` steps); the JSON also
gives the R^2 of the per-episode mean context and the shares of the context's variance that
lie between contexts, between episodes and within an episode (`variance_shares`), and what
else the context holds: the R^2 of probes to the mean reward over the window (task progress,
e.g. the ball in the cup), to the reward at t and to the observation at t. The same
probe on the untrained g_phi of the run's configuration (the agent's init from the run's
seed) is reported as a reference.

Writes into --out (default RUN/probe): ``probe.json`` and ``tsne.png`` (t-SNE of the held-out
contexts, one panel per factor coloured by its true value).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")


def _parser():
    p = argparse.ArgumentParser(prog="python -m dali_jax.probe", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", required=True, help="run directory (config.json + checkpoints/)")
    p.add_argument("--episodes", type=int, default=6, help="episodes per context (default 6)")
    p.add_argument("--grid", type=int, default=4, help="values per factor (default 4: 16 "
                   "contexts)")
    p.add_argument("--length", type=int, default=0,
                   help="env steps per episode (default: min(run episode length, 250), at "
                        "least K + 10)")
    p.add_argument("--contexts", choices=("trained", "both"), default="trained",
                   help="trained (default): vary the factors the run's context setting "
                        "varied, the others at their defaults (both for default/specific "
                        "runs); both: a grid over both factors")
    p.add_argument("--test-per-context", type=int, default=2,
                   help="held-out episodes per context (default 2)")
    p.add_argument("--stride", type=int, default=1, help="probe every STRIDE-th step")
    p.add_argument("--action-repeat", type=int, default=1,
                   help="hold each random action this many steps (default 1; 10 reaches "
                        "more of the task's states, e.g. the ball in the cup)")
    p.add_argument("--policy", choices=("random", "agent"), default="random",
                   help="who acts in the probe's episodes: uniform random actions (default) "
                        "or the run's policy (sampled actions, as in training and evaluation)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes and the t-SNE")
    p.add_argument("--alpha", type=float, default=1e-3, help="ridge penalty (default 1e-3)")
    p.add_argument("--no-random-baseline", action="store_true",
                   help="skip the untrained-encoder reference probe")
    p.add_argument("--no-plot", action="store_true", help="skip the t-SNE plot")
    p.add_argument("--out", default=None, help="output directory (default RUN/probe)")
    return p


def _check_args(args) -> None:
    """ValueError naming the option when a numeric option is out of range."""
    if args.episodes < 2:
        raise ValueError(f"--episodes must be >= 2 (training and held-out), got {args.episodes}")
    if not 1 <= args.test_per_context < args.episodes:
        raise ValueError(f"--test-per-context must be in [1, {args.episodes - 1}], "
                         f"got {args.test_per_context}")
    for name, value, low in (("grid", args.grid, 2), ("stride", args.stride, 1),
                             ("action-repeat", args.action_repeat, 1)):
        if value < low:
            raise ValueError(f"--{name} must be >= {low}, got {value}")
    if args.policy == "agent" and args.action_repeat != 1:
        raise ValueError("--action-repeat holds random actions: it needs --policy random")


def run_probe(args) -> dict:
    import jax
    import numpy as np

    from dali_jax.analysis import episodes as EP
    from dali_jax.analysis import probe as PB
    from dali_jax.training.load import load_run

    _check_args(args)
    run = load_run(args.logdir, step=args.step)
    agent, cfg = run.agent, run.config
    if not agent.inferred:
        raise ValueError(f"{args.logdir} is a {cfg.method} run: it has no inferred context "
                         "(the probe needs dali_s, dali_s_chi or dali_d)")
    K = int(cfg.context.window)
    length = args.length or max(min(int(cfg.run.episode_length), 250), K + 10)
    if length < K:
        raise ValueError(f"--length {length} is shorter than the context window K = {K}")
    t0 = time.time()
    from dali_jax.envs import contexts as C
    varied = C.varied_factors(cfg.task, cfg.context_setting)
    names = list(varied if args.contexts == "trained" and varied else C.FACTORS[cfg.task])
    contexts = EP.context_grid(cfg.task, args.grid, names)
    if args.policy == "agent":
        eps = EP.collect_agent_episodes(agent, run.params, cfg.task, contexts, args.episodes,
                                       length, seed=args.seed, obs_mode=cfg.obs)
    else:
        eps = EP.collect_random_episodes(cfg.task, contexts, args.episodes, length,
                                        seed=args.seed, obs_mode=cfg.obs,
                                        action_repeat=args.action_repeat)
    t_collect = time.time() - t0
    train, test = EP.heldout_split(eps, args.test_per_context)
    factors = eps["factors"][:, [list(eps["factor_names"]).index(n) for n in names]]

    def evaluate(params):
        ctx = PB.episode_contexts(agent, params, eps)
        X, y, ep = PB.step_samples(ctx, factors, start=K - 1, stride=args.stride)
        m = train[ep]
        r_step = PB.linear_probe_r2(X[m], y[m], X[~m], y[~m], alpha=args.alpha)
        mean = ctx[:, K - 1:].mean(1)
        r_ep = PB.linear_probe_r2(mean[train], factors[train], mean[test], factors[test],
                                 alpha=args.alpha)
        shares = PB.variance_shares(ctx[:, K - 1:], eps["context_id"])
        other = {}
        for name, target in others.items():
            Xo, yo, _ = PB.step_samples(ctx, target, start=K - 1, stride=args.stride)
            other[name] = float(np.nanmean(PB.linear_probe_r2(Xo[m], yo[m], Xo[~m], yo[~m],
                                                             alpha=args.alpha)))
        return ctx, X[~m], y[~m], r_step, r_ep, shares, other

    # What else c may hold (per step, (E, L, F) targets): the task's progress over the window,
    # the reward at t, the (vector) observation at t (mean R^2 over its dimensions).
    reward = eps["reward"].astype(np.float64)
    others = dict(window_reward=PB.window_means(reward, K)[..., None], reward=reward[..., None])
    if agent.vector_keys:
        others["observation"] = np.concatenate([eps[k] for k in agent.vector_keys], -1)
    ctx, Xte, yte, r_step, r_ep, shares, other = evaluate(run.params)
    result = dict(
        logdir=args.logdir, task=cfg.task, method=cfg.method, obs=cfg.obs,
        checkpoint_step=int(run.step), window=K, context_dim=int(ctx.shape[-1]),
        factors=names, probe_contexts=args.contexts, policy=args.policy,
        action_repeat=args.action_repeat,
        episode_return=float(eps["reward"].sum(1).mean()),
        contexts=[contexts[i] for i in sorted(contexts)],
        episodes_per_context=args.episodes, test_per_context=args.test_per_context,
        episode_length=length, stride=args.stride, alpha=args.alpha, seed=args.seed,
        samples=dict(train=int(train.sum() * len(range(K - 1, length + 1, args.stride))),
                     test=int(len(Xte))),
        r2_step=dict(zip(names, map(float, r_step))),
        r2_episode_mean=dict(zip(names, map(float, r_ep))),
        variance_shares=shares, other_r2=other,
        context_std=[float(s) for s in ctx[:, K - 1:].reshape(-1, ctx.shape[-1]).std(0)])
    if not args.no_random_baseline:
        init = jax.jit(agent.init)(jax.random.PRNGKey(int(cfg.seed))).params
        _, _, _, b_step, b_ep, b_shares, b_other = evaluate(init)
        result["untrained_encoder"] = dict(r2_step=dict(zip(names, map(float, b_step))),
                                           r2_episode_mean=dict(zip(names, map(float, b_ep))),
                                           variance_shares=b_shares, other_r2=b_other)
    out = args.out or os.path.join(args.logdir, "probe")
    os.makedirs(out, exist_ok=True)
    if not args.no_plot:
        path = os.path.join(out, "tsne.png")
        PB.tsne_plot(Xte, yte, path, names=names, seed=args.seed,
                    title=f"{cfg.task} {cfg.method}: inferred context (held-out episodes)")
        result["tsne"] = "tsne.png"  # relative to probe.json's folder: the folder can move
    result["wall_s"] = dict(collect=t_collect, total=time.time() - t0)
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(result, f, indent=2)
    result["json"] = os.path.join(out, "probe.json")
    if "tsne" in result:
        result["tsne"] = os.path.join(out, "tsne.png")
    return result


def main(argv=None) -> int:
    from dali_jax.training.checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    try:
        res = run_probe(args)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(f"{res['task']} {res['method']} (step {res['checkpoint_step']}, K={res['window']}): "
          f"linear-probe R^2 on held-out episodes ({res['policy']} policy, mean episode "
          f"return {res['episode_return']:.1f})")
    for f in res["factors"]:
        line = (f"  {f:18s} per step {res['r2_step'][f]:+.3f}   "
                f"episode mean {res['r2_episode_mean'][f]:+.3f}")
        if "untrained_encoder" in res:
            u = res["untrained_encoder"]
            line += (f"   (untrained g_phi: {u['r2_step'][f]:+.3f} / "
                     f"{u['r2_episode_mean'][f]:+.3f})")
        print(line)
    v = res["variance_shares"]
    print(f"  variance of c: between contexts {v['context']:.2f}, between episodes "
          f"{v['episode']:.2f}, over time within an episode {v['time']:.2f}")
    u = res.get("untrained_encoder", {}).get("other_r2", {})
    print("  c also holds (R^2): " + ", ".join(
        f"{k} {r:+.3f}" + (f" (untrained {u[k]:+.3f})" if k in u else "")
        for k, r in res["other_r2"].items()))
    print(f"wrote {res['json']}" + (f" and {res['tsne']}" if "tsne" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which alignment loss encodes the dynamics and not the task's progress, on an agent's own data?

    python benchmarks/alignment_on_replay.py --logdir RUN [--options residual_std,inverse,...]
        [--updates 2000] [--test-fraction 0.25] [--seed 0] [--json FILE]

The world-model-only probe (`context_probe.py`) trains on random-policy episodes, where the
ball is rarely caught. A trained agent's replay is where DALI learns: there the ball is caught
in most episodes, and the contexts of trained runs encode the mode (caught or not) better
than gravity (RESULTS.md, `what_c_holds.csv`). This benchmark takes the replay of a run's
latest checkpoint (every complete episode; a random `--test-fraction` of them held out),
trains the context networks of a fresh agent of the run's configuration with each alignment
option on their own terms (`fit_alignment`; what the world-model update does to them, c
being stop-gradient in the world model), and probes the context of every full window of the held-out
episodes (ridge, fitted on the training episodes): R^2 to each varied factor of the run's
context setting (per step), to the mean reward over the window (the task's progress) and to
the reward at t. Rows: the run's own g_phi as trained, an untrained g_phi, then one per option.
A loss that serves DALI holds the factors high and the window reward low.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

from context_probe import OPTIONS  # noqa: E402  (benchmarks/ is on sys.path when run)

from dali_jax import hostmem, overrides  # noqa: E402


def replay_episodes(logdir: str, length: int) -> dict:
    """Complete episodes of `length` steps from the replay of the run's latest checkpoint:
    dict of (E, length, ...) arrays (obs keys, action, reward, is_first/last/terminal)."""
    from dali_jax.training.checkpoint import Checkpointer
    _, tree, _ = Checkpointer(os.path.join(logdir, "checkpoints")).restore({"replay": None})
    data = {k[len("data/"):]: np.asarray(v) for k, v in tree["replay"].items()
            if k.startswith("data/")}
    out = {k: [] for k in data}
    first = data["is_first"]
    for row in range(first.shape[0]):
        for s in np.flatnonzero(first[row]):
            if s + length <= first.shape[1] and not first[row, s + 1:s + length].any():
                for k in data:
                    out[k].append(data[k][row, s:s + length])
    return {k: np.stack(v) for k, v in out.items()}


def fit_alignment(agent, state, episodes, updates, seed=0):
    """`updates` Adam updates of g_phi and its heads on their own terms
    (`agent.context_losses`, the world-model loss's context part; the world model does not
    train g_phi, c being stop-gradient there), with the model optimiser's settings, on
    (B, history + T) sequences of `episodes`. About 5x cheaper than `Agent.model_step`.
    -> params with the trained context networks."""
    import jax
    import jax.numpy as jnp

    from dali_jax.agent import make_optimizer
    from dali_jax.analysis import episodes as EP

    tc = agent.config.train
    opt = make_optimizer(tc.model_lr, tc.model_eps, tc.model_clip)
    weights = agent.context_loss_weights()
    params = state.params
    stats0 = state.align_stats

    @jax.jit
    def step(cp, opt_state, stats, batch):
        def loss_fn(cp):
            p = dict(params, context=cp)
            H, chunk = agent.split_history(batch)
            ctx, aux = agent.context_chunk(p, batch, None, chunk["is_first"].shape[1])
            terms, new_stats, _ = agent.context_losses(cp, aux, ctx, stats)
            return sum(weights[k] * jnp.mean(v) for k, v in terms.items()), new_stats
        (loss, new_stats), g = jax.value_and_grad(loss_fn, has_aux=True)(cp)
        upd, opt_state = opt.update(g, opt_state, cp)
        return jax.tree_util.tree_map(jnp.add, cp, upd), opt_state, new_stats, loss

    cp = params["context"]
    opt_state = opt.init(cp)
    rng = np.random.default_rng(seed)
    keys = tuple(agent.spec.obs)
    stats = stats0
    for _ in range(updates):
        b = EP.sample_batch(episodes, keys, tc.batch_size, agent.sequence_length, rng)
        cp, opt_state, stats, loss = step(cp, opt_state, stats, b)
    return dict(params, context=cp)


def probe_rows(agent, params, eps, train, targets, alpha=1e-3) -> dict:
    """Per-step R^2 of ridge probes from c (full windows) to each target (E, L, F)."""
    from dali_jax.analysis import probe as PB
    K = agent.config.context.window
    ctx = PB.episode_contexts(agent, params, eps)
    out = {}
    for name, y in targets.items():
        X, Y, ep = PB.step_samples(ctx, y, start=K - 1)
        m = train[ep]
        out[name] = float(np.nanmean(PB.linear_probe_r2(X[m], Y[m], X[~m], Y[~m], alpha=alpha)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", required=True)
    p.add_argument("--options", default="residual_std,inverse,both_std,paper")
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="extra config override for every option (e.g. context.head_units=256)")
    p.add_argument("--json", default=None, help="append one JSON line per row")
    args = p.parse_args(argv)
    bad = [o for o in args.options.split(",") if o and o not in OPTIONS]
    if bad:
        p.error(f"unknown option(s) {bad}; valid: {', '.join(OPTIONS)}")
    hostmem.tune_malloc()

    import jax

    from dali_jax.agent import Agent
    from dali_jax.analysis import episodes as EP
    from dali_jax.analysis import probe as PB
    from dali_jax.training.load import load_run

    run = load_run(args.logdir)
    cfg = run.config
    K = int(cfg.context.window)
    L = int(cfg.run.episode_length)
    t0 = time.time()
    eps = replay_episodes(args.logdir, L)
    E = len(eps["is_first"])
    rng = np.random.default_rng(args.seed)
    test = np.zeros(E, bool)
    test[rng.choice(E, int(round(args.test_fraction * E)), replace=False)] = True
    train = ~test
    gt = eps["context"][:, 0].astype(np.float64)  # normalised true context, fixed per episode
    varied = [i for i in range(gt.shape[1]) if gt[:, i].std() > 1e-6]
    reward = eps["reward"].astype(np.float64)
    targets = {f"factor{i}": np.repeat(gt[:, None, i:i + 1], L, 1) for i in varied}
    targets["window_reward"] = PB.window_means(reward, K)[..., None]
    targets["reward"] = reward[..., None]
    print(f"{args.logdir}: {E} episodes of {L} steps from the replay ({train.sum()} train, "
          f"{test.sum()} held out), varied factors {varied}, mean reward {reward.mean():.3f} "
          f"({time.time() - t0:.0f} s)")

    rows = [dict(option="as trained", **probe_rows(run.agent, run.params, eps, train, targets))]
    data = EP.select(eps, train)
    for opt in [o for o in args.options.split(",") if o]:
        c = copy.deepcopy(cfg)
        c.context.alignment = "custom"  # the option sets the fields one by one
        for k, v in OPTIONS[opt].items():
            c.context[k] = v
        overrides.apply_overrides(c, [f"--config.{kv}" for kv in args.set])
        agent = Agent(c, run.agent.spec)
        state = agent.init(jax.random.PRNGKey(args.seed))
        if not rows[1:]:
            rows.append(dict(option="untrained", **probe_rows(agent, state.params, eps, train,
                                                             targets)))
        t1 = time.time()
        params = fit_alignment(agent, state, data, args.updates, seed=args.seed + 1)
        rows.append(dict(option=opt, updates=args.updates, train_s=round(time.time() - t1),
                         **probe_rows(agent, params, eps, train, targets)))
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in rows[-1].items()), flush=True)
    names = [k for k in rows[0] if k != "option"]
    print("| g_phi | " + " | ".join(f"R^2 {n}" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['option']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(logdir=os.path.basename(os.path.normpath(args.logdir)),
                                        sets=args.set, **r)) + "\n")


if __name__ == "__main__":
    main()

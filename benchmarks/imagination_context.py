"""Does a DALI-D world model lean on a context that goes stale in imagination?

    python benchmarks/imagination_context.py --logdir RUN [--episodes 4] [--horizon 15]

In training, imagination holds the start step's context c_t fixed for the whole horizon,
while at acting time c is recomputed every step. If g_phi's context carries state (the
recent trajectory) and the world model uses it, imagined rollouts under a fixed c drift from
those under the context the real trajectory would have had. This script measures it on
random-policy episodes of the run's task (a 4 x 4 grid of the two factors, as the probe):

- filter each episode with the posterior (the run's own contexts) up to a start step t;
- imagine `--horizon` steps open loop under the recorded actions, with the context
  * `fixed`: c_t held fixed (what actor-critic training sees),
  * `updated`: c_{t+k} at step k (the contexts of the real continuation: an oracle),
  * `other-episode`: c_t of another episode of the same context (same factors, other state),
  * `shuffled`: c_t of an episode of another context (wrong factors);
- decode and score each against the true observations: mean squared error in symlog
  space per imagined step (features; pixel runs: per pixel in [0, 1]);
- controllability: imagine from the same start under another episode's actions (fixed c)
  and measure how far the decoded observations move (a prior that leans on a fixed c
  responds less to the actions);
- score the reward head too: MSE of its predictions against the true rewards, and how far
  its predictions move from the `fixed` ones when only c changes (a reward head that reads
  the state from c moves with another episode's c).

`fixed` close to `updated` says a stale context costs imagination little; `other-episode`
far above `fixed` says the model reads episode-specific state from c; `shuffled` above
`other-episode` says it reads the factors. Dreamer-style runs without a context are
rejected (nothing to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logdir", required=True)
    p.add_argument("--episodes", type=int, default=4, help="episodes per context")
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--starts", type=int, default=8, help="start steps per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--action-repeat", type=int, default=1,
                   help="hold each random action this many steps (10 catches the ball now "
                        "and then, so that the reward head is scored on some rewards)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dali_jax.analysis import episodes as EP
    from dali_jax.analysis import probe as PB
    from dali_jax.models import distributions as D
    from dali_jax.models import rssm as R
    from dali_jax.training.load import load_run

    run = load_run(args.logdir)
    agent, cfg, params = run.agent, run.config, run.params
    sw = agent.switches
    if not agent.inferred or not (sw.dynamics or sw.heads):
        raise SystemExit(f"{cfg.method}: the inferred context enters neither the dynamics nor "
                         "the heads (needs dali_d or an ablation of it)")
    dyn = sw.dynamics
    K, H = int(cfg.context.window), args.horizon
    length = K + args.starts * 8 + H + 1
    contexts = EP.context_grid(cfg.task, args.grid)
    eps = EP.collect_random_episodes(cfg.task, contexts, args.episodes, length, seed=args.seed,
                                    obs_mode=cfg.obs, action_repeat=args.action_repeat)
    ctx = jnp.asarray(PB.episode_contexts(agent, params, eps))  # (E, L, Cc)
    E, L = eps["is_first"].shape
    keys = tuple(agent.spec.obs) + ("action", "is_first")
    batch = {k: jnp.asarray(eps[k]) for k in keys if k in eps}
    if "context" in agent.spec.obs and "context" not in batch:
        batch["context"] = jnp.zeros((E, L) + tuple(agent.spec.obs["context"][0]), jnp.float32)
    is_first = batch["is_first"].at[:, 0].set(True)
    embed = agent.encoder.apply({"params": params["encoder"]}, {k: batch[k]
                                                               for k in agent.spec.obs})
    prev = agent.prev_actions(batch["action"].astype(jnp.float32), is_first)
    post, _ = R.observe(agent.rssm, params["rssm"], embed, prev, is_first,
                        jax.random.PRNGKey(args.seed),
                        ctx_post=ctx if sw.posterior else None,
                        ctx_dyn=agent.dyn_context(ctx, is_first) if dyn else None)
    rng = np.random.default_rng(args.seed)
    cid = np.asarray(eps["context_id"])
    other_ep = np.array([rng.choice([j for j in range(E) if cid[j] == cid[i] and j != i])
                         for i in range(E)])
    other_ctx = np.array([rng.choice(np.flatnonzero(cid != cid[i])) for i in range(E)])
    starts = K - 1 + 8 * np.arange(args.starts)

    @jax.jit
    def rollout(start, actions, cseq, key):
        """start (N, ...); actions (N, H, A); cseq (N, H, Cc): context of imagined step k."""
        def step(state, inp):
            a, c, k = inp
            nxt = agent.rssm.apply({"params": params["rssm"]}, state, a, k,
                                   c if dyn else None, method=R.RSSM.img_step)
            return nxt, nxt
        _, traj = jax.lax.scan(step, start, (jnp.swapaxes(actions, 0, 1),
                                             jnp.swapaxes(cseq, 0, 1), jax.random.split(key, H)))
        traj = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), traj)
        hin = agent.head_input(traj, cseq)
        rew = D.TwoHot(agent.reward.apply({"params": params["reward"]}, hin)).mean()
        return agent.decoder.apply({"params": params["decoder"]}, hin), rew

    def target(key, t):
        v = jnp.asarray(eps["obs" if key == "obs" else key])[:, t + 1:t + 1 + H]
        return D.symlog(v.astype(jnp.float32)) if key not in agent.image_keys else v / 255.0

    modes = ("fixed", "updated", "other-episode", "shuffled")
    errs = {m: np.zeros(H) for m in modes}
    rew_err = {m: 0.0 for m in modes}  # reward head: MSE against the true rewards
    rew_shift = {m: 0.0 for m in modes}  # mean |r_hat(m) - r_hat(fixed)|: reads c?
    # Controllability: how far the imagined observations move when only the actions change
    # (another episode's actions from the same start state, fixed c).
    act_effect = np.zeros(H)
    for t in starts:
        start = jax.tree_util.tree_map(lambda x: x[:, t], post)
        actions = batch["action"][:, t:t + H].astype(jnp.float32)
        c_t = ctx[:, t]
        seqs = {"fixed": jnp.repeat(c_t[:, None], H, 1),
                "updated": ctx[:, t:t + H],
                "other-episode": jnp.repeat(ctx[other_ep, t][:, None], H, 1),
                "shuffled": jnp.repeat(ctx[other_ctx, t][:, None], H, 1)}
        r_true = jnp.asarray(eps["reward"], jnp.float32)[:, t + 1:t + 1 + H]
        r_fixed = None
        for m, cs in seqs.items():
            rec, r_hat = rollout(start, actions, cs, jax.random.PRNGKey(int(t)))
            err = sum(((rec[k].astype(jnp.float32) - target(k, t)) ** 2).reshape(E, H, -1)
                      .mean(-1) for k in rec)
            errs[m] += np.asarray(err.mean(0)) / len(starts)
            r_fixed = r_hat if m == "fixed" else r_fixed
            rew_err[m] += float(((r_hat - r_true) ** 2).mean()) / len(starts)
            rew_shift[m] += float(jnp.abs(r_hat - r_fixed).mean()) / len(starts)
            if m == "fixed":
                rec_fixed = rec
        rec_swap, _ = rollout(start, batch["action"][other_ep, t:t + H].astype(jnp.float32),
                              seqs["fixed"], jax.random.PRNGKey(int(t)))
        diff = sum(((rec_swap[k].astype(jnp.float32) - rec_fixed[k].astype(jnp.float32)) ** 2)
                   .reshape(E, H, -1).mean(-1) for k in rec_swap)
        act_effect += np.asarray(diff.mean(0)) / len(starts)
    out = dict(logdir=os.path.basename(os.path.normpath(args.logdir)), method=cfg.method,
               step=int(run.step), horizon=H, episodes=int(E), starts=len(starts),
               error_per_step={m: [float(x) for x in v] for m, v in errs.items()},
               error_mean={m: float(v.mean()) for m, v in errs.items()},
               reward_mse=rew_err, reward_shift_from_fixed=rew_shift,
               reward_mean_true=float(np.mean(eps["reward"])),
               action_effect_per_step=[float(x) for x in act_effect],
               action_effect_mean=float(act_effect.mean()))
    print(f"{cfg.task} {cfg.method} step {run.step}: open-loop error over {H} imagined "
          f"steps (mean; step 1 / step {H})")
    for m, v in errs.items():
        print(f"  {m:14s} {v.mean():.4f}   ({v[0]:.4f} / {v[-1]:.4f})   reward MSE "
              f"{rew_err[m]:.4f}, |r_hat - r_hat(fixed)| {rew_shift[m]:.4f}")
    print(f"  (mean true reward per step {np.mean(eps['reward']):.4f})")
    print(f"  action effect (other actions, fixed c): {act_effect.mean():.4f}   "
          f"({act_effect[0]:.4f} / {act_effect[-1]:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()

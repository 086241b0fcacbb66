"""Which dynamics-alignment loss makes g_phi's context encode the context factors?

    python benchmarks/context_probe.py [--task ball_in_cup|walker] [--options a,b,...]
        [--updates 1500] [--seed 0] [--grid 4] [--episodes 8] [--policy RUN] [--json FILE]

World-model-only experiment: uniform-random-policy episodes (200 steps; `--policy RUN`: the
policy of a trained featurized run of the task, sampled actions) on a grid x grid
set of contexts over the train ranges of the task's two factors (Ball-in-Cup: gravity,
string length; Walker: gravity, actuator strength), half of each context's episodes held
out. For every alignment option a nano DALI-D agent (g_phi hidden 32, f_psi 64 units,
K = 32, chunks of 40 steps + 32 steps of context history) is trained with
`Agent.model_step` only (world model + g_phi + heads) for the same number of updates, then
a ridge probe from the context of every full window to each true factor is fitted on the
training episodes and scored (R^2) on the held-out ones. The untrained encoder (the same
agent at init) is the reference. One line per option, then a markdown table.

Options (context.loss / residual / standardize; the transitions inside each window):
  paper         forward, plain o_{j+1} targets (the paper's form)
  std           forward, standardised o_{j+1}
  residual      forward, o_{j+1} - o_j
  residual_std  forward, standardised o_{j+1} - o_j
  inverse       inverse model a_j from [o_j, o_{j+1}, c]
  both_std      residual_std + inverse
  both_std_w10  residual_std + 10 x inverse
  both_std_w30  residual_std + 30 x inverse   (the project's recipe)
  both_std_w100 residual_std + 100 x inverse

An option may carry config overrides after `@` (`;`-separated), as in `train_step.py`:
`--options "both_std_w10@context.hidden=64;context.inverse_weight=30"`.

Ceilings (not alignment losses; they say how much of the factors the windows hold):
  supervised    the same g_phi trained directly on the standardised factors (a linear
                readout of c, mean squared error; full windows of the training episodes)
  raw_linear    the ridge probe on the raw flattened window of tokens (K x (Do + A))
  raw_mlp       a small MLP read-out (scikit-learn, one hidden layer of 256, early
                stopping) on the same standardised raw windows
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

from dali_jax import hostmem, overrides  # noqa: E402

OPTIONS = {
    "paper": dict(loss="forward", residual=False, standardize=False),
    "std": dict(loss="forward", residual=False, standardize=True),
    "residual": dict(loss="forward", residual=True, standardize=False),
    "residual_std": dict(loss="forward", residual=True, standardize=True),
    "inverse": dict(loss="inverse", residual=False, standardize=False),
    "both_std": dict(loss="both", residual=True, standardize=True),
    # the inverse term weighted up (its error is ~1% of the standardised forward error)
    "both_std_w10": dict(loss="both", residual=True, standardize=True, inverse_weight=10.0),
    "both_std_w30": dict(loss="both", residual=True, standardize=True, inverse_weight=30.0),
    "both_std_w100": dict(loss="both", residual=True, standardize=True, inverse_weight=100.0),
}
CEILINGS = ("supervised", "raw_linear", "raw_mlp")
OBS_DIM = {"ball_in_cup": (8, 2), "walker": (24, 6)}


def probe_config(task: str, option: str, seed: int = 0, window: int = 32):
    """The experiment's agent configuration (nano DALI-D, float32) for one option
    (`NAME` or `NAME@key=value;key=value`)."""
    from dali_jax import config as config_lib
    name, _ = overrides.split_variant(option)
    c = config_lib.get_config()
    c.task, c.method, c.seed = task, "dali_d", seed
    c.model.size = "nano"
    c.model.encdec_release_quirk = False
    c.compute_dtype = "float32"
    c.train.batch_size, c.train.batch_length, c.train.imag_horizon = 16, 40, 5
    c.train.model_lr = 2e-3
    c.context.window, c.context.hidden, c.context.head_units = window, 32, 64
    # The ceilings do not train g_phi with an alignment loss; their agent (whose world
    # model and heads still train) takes residual_std's fields.
    c.context.alignment = "custom"  # the option sets the fields one by one
    for k, v in OPTIONS.get(name, OPTIONS["residual_std"]).items():
        c.context[k] = v
    overrides.apply_variant(c, option, "--options")
    config_lib.validate(c)
    return c


def run(task: str, options, updates: int, seed: int = 0, grid: int = 4, episodes: int = 8,
        length: int = 200, window: int = 32, policy: str | None = None,
        log=print) -> list[dict]:
    """Collect once, then train and probe every option. -> one dict per option."""
    import jax
    import numpy as np

    from dali_jax.agent import Agent, Spec
    from dali_jax.analysis import episodes as EP
    from dali_jax.analysis import probe as PB

    t0 = time.time()
    contexts = EP.context_grid(task, grid)
    if policy:
        eps = agent_episodes(policy, task, contexts, episodes, length, seed)
    else:
        eps = EP.collect_random_episodes(task, contexts, episodes, length, seed=seed)
    train, test = EP.heldout_split(eps, episodes // 2)
    data = EP.select(eps, train)
    names = list(eps["factor_names"])
    log(f"{task}: {len(eps['factors'])} episodes of {length} steps on {grid}x{grid} contexts, "
        f"{'the policy of ' + policy if policy else 'random policy'} "
        f"({time.time() - t0:.0f} s)")
    do, da = OBS_DIM[task]
    spec = Spec(obs={"obs": ((do,), np.float32), "context": ((2,), np.float32)}, action_dim=da)
    rows = []
    for opt in options:
        agent = Agent(probe_config(task, opt, seed, window), spec)
        state = agent.init(jax.random.PRNGKey(seed))
        untrained = jax.tree_util.tree_map(np.array, state.params)
        t1 = time.time()
        hist = [{"loss/dali": float("nan")}]
        base = overrides.split_variant(opt)[0]
        if base == "supervised":
            params, hist = supervised_fit(agent, state.params, eps, train, updates, seed + 1)
        elif not base.startswith("raw_"):
            state, hist = EP.fit_world_model(agent, state, data, updates, seed=seed + 1,
                                            log_every=max(1, updates // 4))
            params = state.params
        train_s = time.time() - t1
        if base.startswith("raw_"):
            r2 = raw_window_probe(agent, eps, train, test, stride=2, mlp=base == "raw_mlp")
        else:
            r2 = PB.window_probe(agent, params, eps, train, test, stride=2)
        r2_0 = PB.window_probe(agent, untrained, eps, train, test, stride=2)
        kind = OPTIONS.get(base, dict(loss=base, residual="-", standardize="-"))
        row = dict(task=task, option=opt, **kind, updates=updates, seed=seed, window=window,
                   policy=policy or "random",
                   episodes=episodes,
                   r2={n: float(v) for n, v in zip(names, r2)},
                   r2_untrained={n: float(v) for n, v in zip(names, r2_0)},
                   gain=[h.get("context/gain", float("nan")) for h in hist],
                   loss_dali=[h["loss/dali"] for h in hist], train_s=train_s)
        rows.append(row)
        log(f"{opt:13s} " + "  ".join(f"{n} {row['r2'][n]:.3f} (untrained "
                                        f"{row['r2_untrained'][n]:.3f})" for n in names)
            + f"  gain {row['gain'][-1]:.4f}  {train_s:.0f} s")
    return rows


def agent_episodes(logdir: str, task: str, contexts, episodes: int, length: int,
                   seed: int) -> dict:
    """Episodes of the trained run at `logdir` (its policy, sampled actions), with the
    observation keys of the probe's agent ("obs" and "context")."""
    from dali_jax.analysis import episodes as EP
    from dali_jax.training.load import load_run
    r = load_run(logdir, task=task)
    if r.config.obs != "features":
        raise SystemExit(f"--policy {logdir}: a featurized run is needed; it is {r.config.obs}")
    return EP.collect_agent_episodes(r.agent, r.params, task, contexts, episodes, length,
                                     seed=seed)


def episode_tokens(agent, eps):
    """Context-encoder tokens [o_k, a_{k-1}] of whole episodes: float32 (E, L, Do + A)."""
    import numpy as np
    obs = np.concatenate([eps[k] for k in agent.vector_keys], -1).astype(np.float32)
    act = np.asarray(eps["action"], np.float32)
    prev = np.concatenate([np.zeros_like(act[:, :1]), act[:, :-1]], 1)
    return np.concatenate([obs, prev], -1)


def full_windows(tok, K, episodes, steps):
    """Windows of steps `steps` (N,) of episodes `episodes` (N,): (N, K, D)."""
    return tok[episodes[:, None], steps[:, None] + np.arange(-K + 1, 1)[None]]


def supervised_fit(agent, params, eps, train, updates, seed, lr=2e-3, batch=640):
    """Ceiling: g_phi and a linear readout trained on the standardised true factors of the
    full windows of the training episodes (Adam, `batch` windows per update).
    -> (params with the trained encoder, [final metrics])."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    K = agent.config.context.window
    tok = episode_tokens(agent, eps)
    y = np.asarray(eps["factors"], np.float32)
    idx = np.flatnonzero(train)
    mu, sd = y[idx].mean(0), y[idx].std(0) + 1e-8
    ys = (y - mu) / sd
    Cc = agent.config.context.dim
    p = dict(enc=params["context"]["encoder"], w=jnp.zeros((Cc, y.shape[1])),
             b=jnp.zeros((y.shape[1],)))
    opt = optax.adam(lr)
    os_ = opt.init(p)

    @jax.jit
    def step(p, os_, win, target):
        def loss_fn(p):
            c = agent.ctx_encoder.apply({"params": p["enc"]}, win)
            return jnp.mean((c @ p["w"] + p["b"] - target) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(p)
        up, os_ = opt.update(g, os_, p)
        return optax.apply_updates(p, up), os_, loss

    rng = np.random.default_rng(seed)
    L = tok.shape[1]
    for _ in range(updates):
        e = rng.choice(idx, batch)
        t = rng.integers(K - 1, L, batch)
        p, os_, loss = step(p, os_, full_windows(tok, K, e, t), ys[e])
    out = jax.tree_util.tree_map(lambda x: x, params)
    out["context"] = dict(params["context"], encoder=p["enc"])
    return out, [{"loss/dali": float(loss)}]


def raw_window_probe(agent, eps, train, test, stride=2, mlp=False):
    """Ceiling of a read-out from the raw flattened window (K x D) of every full window to
    each factor, fitted on `train` episodes and scored on `test`: ridge, or (`mlp`) an MLP
    with one hidden layer of 256 on standardised inputs and factors. -> R^2 (F,)."""
    import numpy as np
    from dali_jax.analysis import probe as PB
    K = agent.config.context.window
    tok = episode_tokens(agent, eps)
    E, L, _ = tok.shape
    steps = np.arange(K - 1, L, stride)
    e = np.repeat(np.arange(E), steps.size)
    t = np.tile(steps, E)
    X = full_windows(tok, K, e, t).reshape(len(e), -1)
    y = np.asarray(eps["factors"], np.float64)[e]
    if not mlp:
        return PB.linear_probe_r2(X[train[e]], y[train[e]], X[test[e]], y[test[e]])
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    tr, te = train[e], test[e]
    mu, sd = y[tr].mean(0), y[tr].std(0) + 1e-12
    net = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=200,
                                                       early_stopping=True, random_state=0))
    net.fit(X[tr], (y[tr] - mu) / sd)
    pred = net.predict(X[te]).reshape(-1, y.shape[1]) * sd + mu
    return np.array([r2_score(y[te][:, i], pred[:, i]) for i in range(y.shape[1])])


def table(rows) -> str:
    names = list(rows[0]["r2"])
    head = ("| task | option | loss | residual | standardize | "
            + " | ".join(f"R^2 {n}" for n in names) + " | "
            + " | ".join(f"untrained {n}" for n in names) + " | context/gain |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['task']} | {r['option']} | {r['loss']} | {r['residual']} | "
                   f"{r['standardize']} | "
                   + " | ".join(f"{r['r2'][n]:.3f}" for n in names) + " | "
                   + " | ".join(f"{r['r2_untrained'][n]:.3f}" for n in names)
                   + f" | {r['gain'][-1]:.4f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="ball_in_cup", choices=sorted(OBS_DIM))
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--episodes", type=int, default=8, help="per context, half held out")
    p.add_argument("--window", type=int, default=32, help="K, the context window")
    p.add_argument("--policy", default=None, metavar="RUN",
                   help="collect with this trained run's policy (default: uniform random)")
    p.add_argument("--json", default=None, help="append one JSON line per option")
    args = p.parse_args(argv)
    opts = args.options.split(",")
    bad = [o for o in opts if overrides.split_variant(o)[0] not in (*OPTIONS, *CEILINGS)]
    if bad:
        p.error(f"unknown option(s) {bad}; valid: {', '.join([*OPTIONS, *CEILINGS])}")
    hostmem.tune_malloc()
    rows = run(args.task, opts, args.updates, args.seed, args.grid, args.episodes,
               window=args.window, policy=args.policy)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Learning checks: the update lowers every loss term on real data, and the agent learns a task.

1. `train_step` on a tiny config, repeated a few hundred times on one fixed batch of real
   Ball-in-Cup transitions (random policy, episode boundaries inside the chunk), lowers every
   loss term it reports (means over the first and the last 10 updates).
2. End to end: a nano DreamerV3 agent (env stepping with `policy_step`, a `Replay`, one
   `train_step` per vector-env step) trained for ~5k steps on the 1-D point-mass task of
   `dali_jax.envs.toy` beats the random policy by a clear margin in deterministic evaluation.

Both are deterministic given their seeds (numpy generators, JAX keys and the replay's counter
stream are all seeded; XLA on CPU is deterministic for a given program). Run with `-s` to see
the measured numbers.
"""
import functools
import time

import jax
import numpy as np
import pytest

from tests.helpers import tiny_config
from dali_jax.agent import Agent, Spec
from dali_jax.envs.dmc import make_env
from dali_jax.envs.toy import controller_return, make_toy_env, random_policy_return
from dali_jax.envs.vector import VectorEnv
from dali_jax.training.replay import Replay

FLAGS = ("is_first", "is_last", "is_terminal")


def _record(transition, action):
    """One step in the Agent's batch format: obs at t, the action taken at t, the reward on
    arriving at t and the flags of t."""
    return dict(transition, action=np.asarray(action, np.float32))


# ------------------------------------------------------------------------------------------
# 1. Every loss term goes down on a fixed batch of real Ball-in-Cup transitions.

BIC_B, BIC_T, BIC_EPISODE = 8, 32, 20  # episodes of 20 steps: a new one starts at t = 21
BIC_CONTEXTS = {0: {"gravity": 9.81}, 1: {"gravity": 14.0}}
FIXED_BATCH_STEPS = 300


@pytest.fixture(scope="module")
def ball_in_cup_batch():
    """(B, T) chunk of random-policy Ball-in-Cup transitions; each row holds the end of one
    episode (is_last at t = 20) and the start of the next (is_first at t = 0 and 21)."""
    fns = [functools.partial(make_env, "ball_in_cup", BIC_CONTEXTS, "features", seed,
                             time_limit=BIC_EPISODE) for seed in range(BIC_B)]
    venv = VectorEnv(fns, parallel=False)
    rng = np.random.default_rng(0)
    steps = []
    try:
        tr = venv.reset()
        for _ in range(BIC_T):
            action = rng.uniform(-1.0, 1.0, (BIC_B, 2)).astype(np.float32)
            steps.append(_record(tr, action))
            tr, _ = venv.step(action)
    finally:
        venv.close()
    batch = {k: np.stack([s[k] for s in steps], 1) for k in steps[0]}
    assert batch["obs"].shape == (BIC_B, BIC_T, 8)
    assert batch["is_first"][:, BIC_EPISODE + 1].all() and batch["is_last"][:, BIC_EPISODE].all()
    assert batch["reward"].sum() > 0  # the ball is in the cup at some steps
    return batch


def _loss_curves(method, batch, steps, **overrides):
    spec = Spec(obs={"obs": ((8,), np.float32), "context": ((2,), np.float32)}, action_dim=2)
    cfg = tiny_config(method, **{"train.batch_size": BIC_B, "train.batch_length": BIC_T,
                                 "xla_opt_level": -1, **overrides})  # many steps: optimise
    agent = Agent(cfg, spec)
    state = agent.init(jax.random.PRNGKey(0))
    history = []
    for i in range(steps):
        state, metrics = agent.train_step(state, batch, jax.random.PRNGKey(i))
        history.append(metrics)
    history = jax.device_get(history)
    return {k: np.array([h[k] for h in history]) for k in history[0]}, cfg


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dreamer_dr", "dali_d"])
def test_train_step_lowers_every_loss_on_real_ball_in_cup(ball_in_cup_batch, method):
    # The critic's output layer starts at zero (uniform two-hot), and its loss is weighted by
    # the imagined continuation weights, which rise from ~0.5^k to ~1 as the continue head
    # learns; at the default critic rate (3e-5) that rise dominates a 300-update window, so
    # the critic learns at 1e-3 here. World model and actor keep their default rates.
    curves, cfg = _loss_curves(method, ball_in_cup_batch, FIXED_BATCH_STEPS,
                               **{"train.critic_lr": 1e-3})
    first = {k: float(v[:10].mean()) for k, v in curves.items()}
    last = {k: float(v[-10:].mean()) for k, v in curves.items()}
    for k in sorted(first):
        if k.startswith("loss/") or k == "model/kl":
            print(f"{method} {k:16s} first10 {first[k]:9.4f}  last10 {last[k]:9.4f}")
    assert all(np.isfinite(v).all() for v in curves.values())

    # Every reported loss term ends lower (dyn / rep: not higher, see below) ...
    free = cfg.model.free_nats
    losses = sorted(k for k in curves if k.startswith("loss/"))
    for k in losses:
        if k in ("loss/dyn", "loss/rep"):
            assert last[k] <= first[k], (k, first[k], last[k])
        else:
            assert last[k] < first[k], (k, first[k], last[k])
    # ... and clearly so. Measured last/first ratios (both methods): recon 0.17-0.18,
    # cont 0.07-0.12, reward 0.79-0.80, critic 0.17-0.20; dali 0.82 with the default
    # standardised residual targets (0.54-0.56 with the paper's raw o_{j+1} targets, whose
    # MSE starts high and is mostly the easy part: o_{j+1} ~ o_j).
    ratio_bounds = {"loss/recon_obs": 0.5, "loss/cont": 0.5, "loss/reward": 0.9,
                    "loss/critic": 0.5}
    if method == "dali_d":
        ratio_bounds["loss/dali"] = 0.9
    assert set(ratio_bounds) <= set(losses)
    for k, bound in ratio_bounds.items():
        assert last[k] < bound * first[k], (k, first[k], last[k])
    # dyn / rep are max(free_nats, KL) per step, so they bottom out at free_nats: the part they
    # optimise is the excess above it, which must shrink to under half (measured: 0.06 -> 0.001
    # and 0.13 -> 0.002).
    for k in ("loss/dyn", "loss/rep"):
        assert last[k] - free < 0.5 * (first[k] - free), (k, first[k], last[k])
    # The raw (unclamped) KL between posterior and prior also ends lower (measured ratio
    # 0.63-0.74). The actor loss (-normalised advantage - entropy bonus, checked above) falls
    # as the reward and critic heads learn and the policy exploits them.
    assert last["model/kl"] < 0.9 * first["model/kl"], (first["model/kl"], last["model/kl"])


# ------------------------------------------------------------------------------------------
# 2. End-to-end learning on the 1-D point mass (dali_jax.envs.toy).

TOY_SPEC = Spec(obs={"obs": ((2,), np.float32), "context": ((2,), np.float32)}, action_dim=1)
TOY_REPLAY_SPEC = {"obs": ((2,), np.float32), "context": ((2,), np.float32),
                   "action": ((1,), np.float32), "reward": ((), np.float32),
                   "is_first": ((), bool), "is_last": ((), bool), "is_terminal": ((), bool)}
NUM_ENVS = 4
ENV_STEPS = 5200          # over all envs: ~100 episodes of 50 steps
PREFILL = 400             # random-policy env steps before the first update
EVAL_SEEDS = (1000, 1001, 1002, 1003)


def test_point_mass_env():
    """Interface of the DMC envs, deterministic given the seed, dense reward in [0, 1]."""
    from dali_jax.envs.toy import PointMassEnv, pd_controller, run_episode
    env = PointMassEnv(seed=3)
    obs, info = env.reset()
    assert set(obs) == {"obs", "context"} and obs["obs"].dtype == np.float32
    assert obs["obs"].shape == (2,) and obs["context"].shape == (2,)
    assert env.observation_space.contains(obs) and env.action_space.shape == (1,)
    actions = np.random.default_rng(0).uniform(-1, 1, (50, 1))
    runs = []
    for _ in range(2):
        env.reset(seed=3)
        out = [env.step(a) for a in actions]
        runs.append([(o["obs"].tolist(), r, te, tr) for o, r, te, tr, _ in out])
    assert runs[0] == runs[1]
    rewards = [r for _, r, _, _ in runs[0]]
    assert all(0.0 <= r <= 1.0 for r in rewards)
    assert [tr for *_, tr in runs[0]] == [False] * 49 + [True]
    assert not any(te for _, _, te, _ in runs[0])
    with pytest.raises(RuntimeError):
        env.step(actions[0])
    assert env.reward(env.target) == 1.0
    # The reference controller gets close to the 50-step maximum; random play does not.
    assert run_episode(PointMassEnv(seed=0), pd_controller(PointMassEnv(seed=0))) > 38
    assert random_policy_return(episodes=50, seed=0) < 15


def _toy_config():
    # Nano networks, short chunks and imagination horizon; gamma = 1 - 1/20 suits 50-step
    # episodes; learning rates 10x the defaults make ~1200 updates enough.
    return tiny_config("dreamer_dr", **{
        "train.batch_size": 8, "train.batch_length": 16, "train.imag_horizon": 10,
        "train.horizon": 20, "train.model_lr": 1e-3, "train.actor_lr": 3e-4,
        "train.critic_lr": 3e-4, "xla_opt_level": -1})


def _act(agent, params, carry, tr, key, mode):
    obs = {k: tr[k] for k in ("obs", "context", "is_first")}
    action, carry = agent.policy_step(params, carry, obs, key, mode=mode)
    return np.asarray(action), carry


def _evaluate(agent, params, key):
    """Returns of one deterministic-policy (mode) episode per evaluation seed."""
    venv = VectorEnv([functools.partial(make_toy_env, s) for s in EVAL_SEEDS], parallel=False)
    carry = agent.initial_carry(params, len(EVAL_SEEDS))
    returns = {}
    try:
        tr = venv.reset()
        while len(returns) < len(EVAL_SEEDS):
            key, k = jax.random.split(key)
            action, carry = _act(agent, params, carry, tr, k, "mode")
            tr, episodes = venv.step(action)
            for ep in episodes:
                returns.setdefault(ep.env_index, ep.episode_return)
    finally:
        venv.close()
    return [returns[i] for i in range(len(EVAL_SEEDS))]


@pytest.mark.slow
def test_end_to_end_learning_point_mass():
    t0 = time.perf_counter()
    cfg = _toy_config()
    agent = Agent(cfg, TOY_SPEC)
    state = agent.init(jax.random.PRNGKey(0))
    venv = VectorEnv([functools.partial(make_toy_env, i) for i in range(NUM_ENVS)],
                     parallel=False)
    replay = Replay(ENV_STEPS, NUM_ENVS, TOY_REPLAY_SPEC, seq_len=cfg.train.batch_length,
                    seed=0)
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(1)
    carry = agent.initial_carry(state.params, NUM_ENVS)
    train_returns, updates = [], 0
    try:
        tr = venv.reset()
        for it in range(ENV_STEPS // NUM_ENVS):
            key, k_act, k_train = jax.random.split(key, 3)
            action, carry = _act(agent, state.params, carry, tr, k_act, "sample")
            if it * NUM_ENVS < PREFILL:
                action = rng.uniform(-1.0, 1.0, action.shape).astype(np.float32)
                carry["prev_action"] = action
            replay.add(_record(tr, action))
            tr, episodes = venv.step(action)
            train_returns += [ep.episode_return for ep in episodes]
            if it * NUM_ENVS >= PREFILL:
                state, metrics = agent.train_step(state, replay.sample(cfg.train.batch_size),
                                                  k_train)
                updates += 1
    finally:
        venv.close()
    train_time = time.perf_counter() - t0

    returns = _evaluate(agent, state.params, jax.random.PRNGKey(2))
    trained = float(np.mean(returns))
    random_ret = random_policy_return(episodes=200, seed=EVAL_SEEDS[0])
    reference = controller_return(episodes=20, seed=EVAL_SEEDS[0])  # near-optimal PD control
    fraction = (trained - random_ret) / (reference - random_ret)
    print(f"\npoint mass: {updates} updates, {ENV_STEPS} env steps, train {train_time:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s")
    print(f"  training episode returns (first 8 / last 8): {np.mean(train_returns[:8]):.1f} / "
          f"{np.mean(train_returns[-8:]):.1f}")
    print(f"  eval returns {np.round(returns, 1).tolist()} mean {trained:.1f}; random "
          f"{random_ret:.1f}; PD controller {reference:.1f}; fraction of gap {fraction:.2f}")
    assert np.isfinite(jax.device_get(metrics)["loss/recon_obs"])
    # Measured: random ~8, PD ~41, trained 35-39 (80-93% of the gap) over seeds and code
    # revisions; require 60% of the gap, i.e. about 28 of a possible ~41.
    assert trained >= random_ret + 0.6 * (reference - random_ret), (returns, random_ret,
                                                                    reference)

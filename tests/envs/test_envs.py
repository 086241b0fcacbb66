"""Contextual DMC envs: dm_control / carl-bench equivalence, context effects, API, failures."""
import warnings

import numpy as np
import pytest

from dali_jax.envs import contexts as C
from dali_jax.envs.carl_dmc import CARLDMCAdapter, import_carl_dmc
from dali_jax.envs.context_env import PhysicsInstabilityWarning
from dali_jax.envs.dmc import make_env
from dali_jax.envs.live_tasks import BallInCupEnv, WalkerEnv

OBS_DIM = {"ball_in_cup": 8, "walker": 24}
ACT_DIM = {"ball_in_cup": 2, "walker": 6}


def _actions(n, dim, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, dim))


# ---------------------------------------------------------------------------------------------
# Interface

@pytest.mark.parametrize("task", ["ball_in_cup", "walker"])
def test_observation_modes(task):
    ctxs = C.make_context_set(task, "double_box", seed=0, n=5)
    env = make_env(task, ctxs, obs_mode="both", seed=1)
    obs, info = env.reset()
    assert set(obs) == {"obs", "context", "image"}
    assert obs["obs"].dtype == np.float32 and obs["obs"].shape == (OBS_DIM[task],)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (64, 64, 3)
    assert obs["context"].dtype == np.float32 and obs["context"].shape == (2,)
    np.testing.assert_array_equal(obs["context"], C.normalize_context(task, env.context))
    assert info["context_id"] == env.context_id and env.context == ctxs[env.context_id]
    assert env.context_features == C.FACTORS[task]
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (ACT_DIM[task],)
    obs2, r, term, trunc, info = env.step(env.action_space.sample())
    assert env.observation_space.contains(obs2) and isinstance(r, float)
    assert term is False and trunc is False
    assert np.abs(obs2["image"].astype(int) - obs["image"]).sum() > 0
    env.close()
    feats = make_env(task, ctxs, obs_mode="features")
    assert set(feats.reset()[0]) == {"obs", "context"}
    pix = make_env(task, ctxs, obs_mode="pixels")
    assert set(pix.reset()[0]) == {"image", "context"}
    pix.close()
    with pytest.raises(ValueError):
        make_env(task, ctxs, obs_mode="rgb")


def test_episode_length_and_flags():
    env = make_env("ball_in_cup")
    env.reset()
    for t in range(1, 1001):
        _, r, term, trunc, _ = env.step(np.zeros(2))
        assert term is False and 0.0 <= r <= 1.0
        assert trunc == (t == 1000)
    with pytest.raises(RuntimeError):
        env.step(np.zeros(2))
    env.reset()
    env.step(np.zeros(2))
    with pytest.raises(ValueError):
        env.step(np.array([np.nan, 0.0]))


def test_context_selection_round_robin_and_options():
    ctxs = {10: {"gravity": 5.0}, 11: {"gravity": 7.0}, 12: {"gravity": 12.0}}
    env = make_env("ball_in_cup", ctxs, seed=0, time_limit=1)
    seen = []
    for _ in range(6):
        env.reset()
        seen.append(env.context_id)
        assert env.model.opt.gravity[2] == -ctxs[env.context_id]["gravity"]
    assert sorted(seen[:3]) == sorted(seen[3:]) == [10, 11, 12]
    other = make_env("ball_in_cup", ctxs, seed=1, time_limit=1)
    orders = {tuple(seen)}
    for seed in range(1, 6):
        e = make_env("ball_in_cup", ctxs, seed=seed)
        orders.add(tuple(e.reset()[1]["context_id"] for _ in range(6)))
    assert len(orders) > 1  # each env (seed) its own order
    obs, info = other.reset(options={"context_id": 12})
    assert info["context_id"] == 12 and other.context == {"gravity": 12.0, "string_length": 0.3}
    assert other.model.opt.gravity[2] == -12.0
    with pytest.raises(KeyError):
        other.reset(options={"context_id": 99})
    # a custom selector
    fixed = make_env("ball_in_cup", ctxs, context_selector=lambda: 11)
    assert [fixed.reset()[1]["context_id"] for _ in range(3)] == [11, 11, 11]


def test_seeding_reproducible():
    a, b, c = (make_env("walker", seed=s) for s in (3, 3, 4))
    oa, ob, oc = a.reset()[0]["obs"], b.reset()[0]["obs"], c.reset()[0]["obs"]
    np.testing.assert_array_equal(oa, ob)
    assert np.abs(oa - oc).max() > 1e-3
    assert np.abs(a.data.qpos[2:]).max() > 0  # initial joint angles are randomised


def test_invalid_contexts_raise():
    with pytest.raises(ValueError, match="'string_length'.*\\(0, 0.9\\]"):
        make_env("ball_in_cup", {0: {"string_length": 0.0}})
    with pytest.raises(ValueError, match="'gravity'.*\\[0, inf\\)"):
        make_env("walker", {0: {"gravity": -9.81}})
    with pytest.raises(ValueError, match="'friction'"):
        make_env("walker", {0: {"friction": 1.0}})
    with pytest.raises(ValueError, match="unknown carl-bench"):
        make_env("cheetah")


# ---------------------------------------------------------------------------------------------
# Faithfulness

@pytest.mark.parametrize("task,domain,name", [("ball_in_cup", "ball_in_cup", "catch"),
                                               ("walker", "walker", "walk")])
def test_default_context_matches_dm_control(task, domain, name):
    """Same seed -> same initial state; same actions -> identical trajectory and rewards."""
    from dm_control import suite
    env = make_env(task, seed=7)
    ref = suite.load(domain, name, task_kwargs={"random": 7})
    obs, _ = env.reset()
    ts = ref.reset()
    ref_obs = np.concatenate([np.ravel(v) for v in ts.observation.values()]).astype(np.float32)
    np.testing.assert_array_equal(obs["obs"], ref_obs)
    for a in _actions(100, ACT_DIM[task]):
        obs, r, _, _, _ = env.step(a)
        ts = ref.step(a)
        assert r == ts.reward
    np.testing.assert_array_equal(env.data.qpos, ref.physics.data.qpos)
    np.testing.assert_array_equal(env.data.qvel, ref.physics.data.qvel)


def _carl_walker(ctx):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        carl = import_carl_dmc().CARLDmcWalkerEnv(contexts={0: ctx})
        carl.reset()
    return carl, carl.env.env.physics


def _compare_with_carl(ctx, steps):
    """Copies our start state into CARL's walker; -> (max |dqpos|, max |dreward|, physics)."""
    env = make_env("walker", {0: ctx}, seed=0)
    env.reset()
    carl, phys = _carl_walker(ctx)
    phys.data.qpos[:] = env.data.qpos
    phys.data.qvel[:] = env.data.qvel
    phys.after_reset()
    dq = dr = 0.0
    for a in _actions(steps, 6, seed=1):
        obs, r, _, _, _ = env.step(a)
        cobs, cr, _, _, _ = carl.step(a)
        dq = max(dq, np.abs(env.data.qpos - phys.data.qpos).max())
        dr = max(dr, abs(r - cr))
    return dq, dr, env, phys


def test_walker_matches_carl_under_nondefault_context():
    dq, dr, env, phys = _compare_with_carl({"gravity": 14.7, "actuator_strength": 0.6}, 200)
    assert dq < 1e-9 and dr < 1e-9  # measured: exactly 0.0
    np.testing.assert_array_equal(env.model.actuator_gear, phys.model.actuator_gear)
    np.testing.assert_array_equal(env.model.opt.gravity, phys.model.opt.gravity)


def test_walker_extra_features_match_carl():
    ctx = {"gravity": 5.0, "actuator_strength": 1.3, "friction_tangential": 0.8,
           "friction_torsional": 1.5, "friction_rolling": 2.0, "timestep": 0.005,
           "joint_damping": 2.0, "joint_stiffness": 3.0, "density": 1.2, "viscosity": 0.1,
           "wind_x": 0.5, "wind_y": -0.2, "wind_z": 0.1}
    dq, dr, env, _ = _compare_with_carl(ctx, 100)
    assert env._n_sub == 5
    assert dq < 1e-9 and dr < 1e-9  # measured: exactly 0.0
    # geom_density rescales masses: equal to CARL's recompiled model up to rounding.
    env = make_env("walker", {0: {"geom_density": 1.3}})
    env.reset()
    _, phys = _carl_walker({"geom_density": 1.3})
    cm = phys.model.ptr
    for field in ("body_mass", "body_inertia", "body_subtreemass", "dof_M0", "dof_invweight0",
                  "body_invweight0", "actuator_acc0"):
        np.testing.assert_allclose(getattr(env.model, field), getattr(cm, field), rtol=1e-12,
                                   atol=1e-12, err_msg=field)
    assert env.model.stat.meaninertia == pytest.approx(cm.stat.meaninertia, rel=1e-12)


def test_ball_in_cup_gravity_changes_free_fall():
    """Ball beside the cup on a slack string, zero action: drop after 0.1 s ~ g t^2 / 2.

    Measured drops: g=4.9 -> 0.0250 m, g=14.7 -> 0.0750 m (semi-implicit Euler, 5 x 10 steps).
    """
    drops = {}
    for g in (4.9, 14.7):
        env = make_env("ball_in_cup", {0: {"gravity": g}})
        env.reset()
        env.set_state(np.array([0.0, 0.0, 0.15, 0.29]), np.zeros(4))
        z0 = env.data.xpos[env._ball, 2]
        for _ in range(5):
            env.step(np.zeros(2))
        drops[g] = z0 - env.data.xpos[env._ball, 2]
        assert drops[g] == pytest.approx(0.5 * g * 0.1 ** 2, rel=0.05)
    assert drops[14.7] / drops[4.9] == pytest.approx(3.0, rel=0.01)


def test_ball_in_cup_string_length_changes_hanging_distance():
    """Hanging at rest, the ball sits L below the cup's anchor; its body starts 0.3 - L higher.

    Measured after 6 s: L=0.15 -> 0.1506 m, L=0.3 -> 0.3006 m, L=0.4 -> 0.4006 m
    (distance between the cup and ball sites).
    """
    for length in (0.15, 0.3, 0.4):
        env = make_env("ball_in_cup", {0: {"string_length": length}})
        env.reset()
        assert env.model.tendon_range[env._string].tolist() == [0.0, length]
        assert env.model.body_pos[env._ball, 2] == pytest.approx(0.2 + 0.3 - length)
        env.set_state(np.zeros(4), np.zeros(4))  # ball 0.008 m beyond the string length
        for _ in range(300):
            env.step(np.zeros(2))
        cup = env.data.site_xpos[env.model.site("cup").id]
        ball = env.data.site_xpos[env.model.site("ball").id]
        assert np.linalg.norm(cup - ball) == pytest.approx(length, abs=0.003)
        assert abs(env.data.qvel[3]) < 1e-2  # at rest


def test_ball_in_cup_reward_and_context_switch_restores_model():
    env = make_env("ball_in_cup", {0: {"string_length": 0.15, "gravity": 3.0}, 1: {}})
    env.reset(options={"context_id": 1})
    # ball at the target (cup body z 0.6, target 0.05 below; ball body z 0.2)
    env.set_state(np.array([0.0, 0.0, 0.0, 0.35]), np.zeros(4))
    assert env.in_target() == 1.0
    env.set_state(np.array([0.0, 0.0, 0.2, 0.1]), np.zeros(4))
    assert env.in_target() == 0.0
    env.reset(options={"context_id": 0})
    assert env.model.body_pos[env._ball, 2] == pytest.approx(0.35)
    env.reset(options={"context_id": 1})
    assert env.model.body_pos[env._ball, 2] == 0.2 and env.model.opt.gravity[2] == -9.81
    assert env.model.tendon_range[env._string, 1] == 0.3


def test_pixels_show_context():
    """Same start state, zero action: after 0.4 s the frames differ between gravities."""
    frames = []
    for g in (2.45, 17.64):
        env = make_env("ball_in_cup", {0: {"gravity": g}}, obs_mode="pixels")
        env.reset()
        env.set_state(np.array([0.0, 0.0, 0.15, 0.29]), np.zeros(4))
        for _ in range(20):
            obs, *_ = env.step(np.zeros(2))
        frames.append(obs["image"].astype(int))
        env.close()
    assert np.abs(frames[0] - frames[1]).sum() > 1000


def test_instability_truncates_with_warning():
    env = make_env("ball_in_cup", {0: {"gravity": 1e12}})
    env.reset()
    with pytest.warns(PhysicsInstabilityWarning, match="unstable"):
        obs, r, term, trunc, info = env.step(np.ones(2))
    assert trunc is True and term is False and info["unstable"] and r == 0.0
    assert np.all(np.isfinite(obs["obs"]))
    env.reset()  # usable again


# ---------------------------------------------------------------------------------------------
# carl-bench adapter

def test_carl_adapter_pointmass_and_quadruped():
    env = make_env("pointmass", {0: {"mass": 0.3}, 1: {"mass": 0.5}}, obs_mode="both", seed=0)
    assert isinstance(env, CARLDMCAdapter) and env.context_features == ("mass",)
    obs, info = env.reset(options={"context_id": 1})
    assert obs["obs"].shape == (4,) and obs["obs"].dtype == np.float32
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    np.testing.assert_array_equal(obs["context"], [1.0])
    assert env.physics.named.model.body_mass["pointmass"] == pytest.approx(0.5)
    obs, r, term, trunc, info = env.step(np.zeros(2))
    assert info["context_id"] == 1 and not term and not trunc
    with pytest.raises(ValueError, match="'masse'"):
        make_env("pointmass", {0: {"masse": 1.0}})
    quad = make_env("quadruped", {0: {"gravity": 5.0}})
    assert quad.reset()[0]["obs"].shape == (78,)
    quad.step(np.zeros(12))


def test_live_env_class_api():
    assert set(WalkerEnv.get_context_features()) == set(C.FEATURES["walker"])
    assert BallInCupEnv.get_default_context() == C.DEFAULTS["ball_in_cup"]

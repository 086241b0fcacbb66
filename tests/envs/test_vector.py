"""VectorEnv: DreamerV3 flags, auto-reset, episode reports, worker failures, instabilities."""
import functools
import os
import warnings

import numpy as np
import pytest

from dali_jax.envs.context_env import PhysicsInstabilityWarning
from dali_jax.envs.dmc import make_env
from dali_jax.envs.live_tasks import BallInCupEnv
from dali_jax.envs.vector import VectorEnv, VectorEnvWarning

CTXS = {0: {"gravity": 5.0}, 1: {"gravity": 9.81, "string_length": 0.2}, 2: {"gravity": 14.0}}


class FaultyEnv(BallInCupEnv):
    """Ball-in-Cup that fails at its ``fail_at``-th step: raises, or kills its process."""

    def __init__(self, fail_at: int, mode: str = "raise", **kw):
        super().__init__(**kw)
        self.fail_at, self.mode, self.calls = fail_at, mode, 0

    def step(self, action):
        self.calls += 1
        if self.calls == self.fail_at:
            if self.mode == "exit":
                os._exit(3)
            raise RuntimeError("injected failure")
        return super().step(action)


def _fns(n, time_limit=5, obs_mode="features", **kw):
    return [functools.partial(make_env, "ball_in_cup", CTXS, obs_mode, i, time_limit=time_limit,
                              **kw) for i in range(n)]


@pytest.fixture(scope="module", params=[False, True], ids=["inprocess", "subprocess"])
def parallel(request):
    return request.param


def test_flags_auto_reset_and_reports(parallel):
    venv = VectorEnv(_fns(2, time_limit=5, obs_mode="both"), parallel=parallel)
    try:
        b = venv.reset()
        assert b["obs"].shape == (2, 8) and b["obs"].dtype == np.float32
        assert b["context"].shape == (2, 2) and b["image"].shape == (2, 64, 64, 3)
        assert b["image"].dtype == np.uint8
        assert b["reward"].dtype == np.float32 and b["is_first"].dtype == bool
        assert b["is_first"].all() and not b["is_last"].any() and not b["is_terminal"].any()
        assert (b["reward"] == 0).all()
        rewards = np.zeros(2)
        first_ctx = b["context"].copy()
        for t in range(1, 6):
            b, eps = venv.step(np.zeros((2, 2)))
            rewards += b["reward"]
            assert not b["is_first"].any() and not b["is_terminal"].any()
            assert b["is_last"].all() == (t == 5)
            np.testing.assert_array_equal(b["context"], first_ctx)
        assert len(eps) == 2
        for ep in eps:
            assert ep.length == 5 and ep.episode_return == pytest.approx(rewards[ep.env_index])
            assert ep.context_id in CTXS and ep.context["gravity"] == CTXS[ep.context_id]["gravity"]
            assert ep.truncated and not ep.unstable and ep.error is None
        # next step ignores the action, resets: is_first, reward 0, next context of the order
        b, eps = venv.step(np.full((2, 2), np.nan))
        assert b["is_first"].all() and not b["is_last"].any() and (b["reward"] == 0).all()
        assert eps == []
        b, _ = venv.step(np.zeros((2, 2)))
        assert not b["is_first"].any()
    finally:
        venv.close()


def test_subprocess_matches_inprocess():
    acts = np.random.default_rng(0).uniform(-1, 1, (12, 2, 2))
    out = []
    for parallel in (False, True):
        venv = VectorEnv(_fns(2, time_limit=4), parallel=parallel)
        obs = [venv.reset()["obs"]]
        ids = []
        for a in acts:
            b, eps = venv.step(a)
            obs.append(b["obs"])
            ids += [(e.env_index, e.context_id) for e in eps]
        venv.close()
        out.append((np.stack(obs), ids))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1] and len(out[0][1]) == 4  # two episodes per env


@pytest.mark.parametrize("parallel,mode", [(False, "raise"), (True, "raise"), (True, "exit")],
                         ids=["inprocess-raise", "subprocess-raise", "subprocess-exit"])
def test_worker_failure_ends_episode_and_restarts(parallel, mode):
    fns = _fns(1, time_limit=50) + [functools.partial(
        FaultyEnv, 3, mode, contexts=CTXS, seed=5, time_limit=50)]
    venv = VectorEnv(fns, parallel=parallel, timeout=60)
    try:
        venv.reset()
        b, _ = venv.step(np.zeros((2, 2)))
        b, _ = venv.step(np.zeros((2, 2)))
        prev = b["obs"][1].copy()
        with pytest.warns(VectorEnvWarning, match="restart"):
            b, eps = venv.step(np.zeros((2, 2)))
        assert b["is_last"].tolist() == [False, True] and not b["is_terminal"].any()
        np.testing.assert_array_equal(b["obs"][1], prev)  # last known observation
        assert b["reward"][1] == 0
        assert len(eps) == 1 and eps[0].env_index == 1 and eps[0].length == 3
        assert eps[0].error and eps[0].truncated
        assert venv.restarts.tolist() == [0, 1]
        b, eps = venv.step(np.zeros((2, 2)))  # the restarted env starts a new episode
        assert b["is_first"].tolist() == [False, True] and eps == []
        b, _ = venv.step(np.zeros((2, 2)))
        assert not b["is_first"].any() and not b["is_last"].any()
    finally:
        venv.close()


def test_instability_is_reported_and_vector_env_keeps_running(parallel):
    fns = [functools.partial(make_env, "ball_in_cup", {0: {"gravity": 1e12}}, seed=0),
           functools.partial(make_env, "ball_in_cup", {0: {}}, seed=1)]
    venv = VectorEnv(fns, parallel=parallel)
    try:
        venv.reset()
        reports = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                b, eps = venv.step(np.ones((2, 2)))
                reports += eps
                assert np.isfinite(b["obs"]).all()
        if not parallel:  # in a worker, the warning is the worker's (and logged here)
            assert any(issubclass(w.category, PhysicsInstabilityWarning) for w in caught)
        assert len(reports) == 2 and all(r.unstable and r.env_index == 0 for r in reports)
        assert reports[0].length == 1 and reports[0].context == {"gravity": 1e12,
                                                                 "string_length": 0.3}
        assert venv.restarts.tolist() == [0, 0]
    finally:
        venv.close()

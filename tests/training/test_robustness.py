"""What long studies meet: non-finite updates, SIGKILL at any moment, a full disk or an
unwritable checkpoint directory, extreme contexts, damaged run directories."""
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from tests.helpers import random_batch
from dali_jax.training.checkpoint import CheckpointError, CheckpointSaveError, Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import ball_in_cup  # noqa: E402


def _host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def _assert_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _smoke(logdir, method="dreamer_dr", steps=400, **run):
    cfg = ball_in_cup.get_config("smoke")
    cfg.method = method
    cfg.logdir = str(logdir)
    cfg.run.steps = steps
    cfg.run.save_every_s = 1e9
    for k, v in run.items():
        cfg.run[k] = v
    return cfg


# ------------------------------------------------------------------------ non-finite updates
def test_nonfinite_batch_is_skipped_with_the_state_bitwise_unchanged(agent_cache):
    agent = agent_cache("dali_d")  # the train step test_agent compiles (same batch shape)
    state = agent.init(jax.random.PRNGKey(0))
    batch = random_batch(agent.spec)
    # a finite batch is applied (the guard does not hold back good updates)
    before = _host(state)
    state, m = agent.train_step(state, batch, jax.random.PRNGKey(1))
    assert float(m["train/nonfinite"]) == 0.0 and int(state.step) == 1
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(state.params)[0]),
                              jax.tree_util.tree_leaves(before.params)[0])
    bad_obs = dict(batch, obs=batch["obs"].copy())
    bad_obs["obs"][1, -3, 2] = np.nan
    bad_reward = dict(batch, reward=batch["reward"].copy())
    bad_reward["reward"][0, -1] = np.inf  # the two-hot loss clips it: only the input check
    for bad in (bad_obs, bad_reward):
        before = _host(state)
        state, m = agent.train_step(state, bad, jax.random.PRNGKey(2))
        assert float(m["train/nonfinite"]) == 1.0
        assert float(m["train/nonfinite_inputs"]) == 1.0
        _assert_bitwise_equal(_host(state), before)  # params, opt, slow critic, retnorm, step
    # the world-model-only update has the same guard
    before = _host(state)
    state, m = agent.model_step(state, bad_obs, jax.random.PRNGKey(3))
    assert float(m["train/nonfinite"]) == 1.0
    _assert_bitwise_equal(_host(state), before)


# ------------------------------------------------------------------------------ disk trouble
def _tree(v):
    return {"w": jax.numpy.full((3,), float(v)), "replay": np.full((1000,), v, np.float32)}


def test_metrics_log_survives_a_full_disk(tmp_path, caplog):
    from dali_jax.training.logger import Logger

    class FullDisk:  # a handle whose writes fail as on a full disk, after half a line
        closed = False

        def __init__(self, real):
            self.real = real

        def write(self, text):
            self.real.write(text[:len(text) // 2])
            self.real.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.closed = True
            self.real.close()

    lg = Logger(tmp_path, use_tensorboard=False)
    lg.scalars(1, {"a": 1.0})
    lg._jsonl = FullDisk(lg._jsonl)
    with caplog.at_level(logging.WARNING, logger="dali_jax.training.logger"):
        lg.scalars(2, {"a": 2.0})  # dropped, logged
        lg.scalars(3, {"a": 3.0})  # written again on a fresh line
    lg.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert any("cannot write metrics to" in m and "metrics.jsonl" in m for m in msgs)
    assert any("1 record(s) were dropped" in m for m in msgs)
    from dali_jax.analysis.curves import read_metrics
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 3]


class _Poisoned:
    """A task env whose observations are NaN from its `start`-th step on (its actions are
    made finite first, as the policy acting on NaN observations gives NaN actions)."""

    def __init__(self, env, start):
        self.env, self.start, self.t = env, start, 0

    def __getattr__(self, name):
        return getattr(self.env, name)

    def _obs(self, obs):
        if self.t >= self.start:
            obs = dict(obs, obs=np.full_like(obs["obs"], np.nan))
        return obs

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        return self._obs(obs), info

    def step(self, action):
        obs, *rest = self.env.step(np.nan_to_num(np.asarray(action, np.float32)))
        self.t += 1
        return (self._obs(obs), *rest)


def _poisoned_factory(start):
    from dali_jax.envs.dmc import make_env

    def factory(**kw):
        return _Poisoned(make_env("ball_in_cup", **kw), start)
    return factory


def test_consecutive_nonfinite_updates_stop_the_run_with_the_last_good_checkpoint(
        tmp_path, caplog):
    from dali_jax.training.train import NonFiniteError, Trainer

    # 80 replay steps: once the envs emit NaN observations every sampled batch holds some.
    cfg = _smoke(tmp_path / "run", replay_capacity=80, log_every_s=0.0, max_nonfinite=5)
    Trainer(cfg, stop_after_env_steps=120).run()  # 10 good updates, checkpoint at 120
    ckdir = tmp_path / "run" / "checkpoints"
    assert Checkpointer(ckdir).steps() == [120]
    trainer = Trainer(cfg, env_factory=_poisoned_factory(start=10))  # NaN from env step 140
    with caplog.at_level(logging.WARNING, logger="dali_jax.train"):
        with pytest.raises(NonFiniteError) as info:
            trainer.run()
    msg = str(info.value)
    assert "5 consecutive updates" in msg and "config.run.max_nonfinite=5" in msg
    assert "loss/recon_obs=nan" in msg and "batch input value(s)" in msg
    assert "ckpt_00000120" in msg
    warned = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert warned and "loss/recon_obs=nan" in warned[0]
    assert 140 < trainer.env_steps < 400 and trainer.nonfinite_skipped >= 5
    # No checkpoint after the good one; the state the run stopped with is the last good one.
    assert Checkpointer(ckdir).steps() == [120]
    _, tree, _ = Checkpointer(ckdir).restore()
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree["agent"])
               if np.issubdtype(x.dtype, np.inexact))
    params = jax.device_get(trainer.state.params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    skipped = [l["train/nonfinite_skipped"] for l in lines if "train/nonfinite_skipped" in l]
    assert skipped[0] == 0 and 0 < max(skipped) <= trainer.nonfinite_skipped
    # Never a checkpoint of non-finite values.
    leaf = trainer.state.params["reward"]
    trainer.state.params["reward"] = jax.tree_util.tree_map(lambda x: x * np.nan, leaf)
    with pytest.raises(NonFiniteError, match=r"not checkpointing.*\['params'\]\['reward'\]"):
        trainer.save()
    assert Checkpointer(ckdir).steps() == [120]


def test_failed_periodic_saves_are_logged_and_tolerated_then_stop_the_run(
        tmp_path, monkeypatch, caplog):
    from dali_jax.training.train import Trainer

    # A save every env step; the run stops within the 100-step prefill (no update compiled).
    cfg = _smoke(tmp_path / "run", save_every_s=0.0, max_save_failures=2)
    fail_at = {2, 3, 6, 7, 8, 9}  # save calls that find the disk full
    calls = []
    real = Checkpointer._orbax_save

    def write(self, step, items, meta):
        calls.append(step)
        if len(calls) - 1 in fail_at:  # a partial write, then the disk is full
            tmp = os.path.join(self.directory, f"ckpt_{step:08d}.orbax-checkpoint-tmp-1")
            os.makedirs(tmp)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tmp, "x"))
        return real(self, step, items, meta)

    monkeypatch.setattr(Checkpointer, "_orbax_save", write)
    trainer = Trainer(cfg)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(CheckpointSaveError) as info:
            trainer.run()
    # Saves at env steps 2, 4 written; 6, 8 failed (2 in a row: tolerated); 10, 12 written;
    # 14, 16 failed; 18 failed: 3 in a row > run.max_save_failures = 2 stops the run; the
    # final save (18 again) after the error fails too and is only logged.
    assert calls == [2, 4, 6, 8, 10, 12, 14, 16, 18, 18]
    ckdir = tmp_path / "run" / "checkpoints"
    good = Checkpointer(ckdir)
    assert good.steps() == [10, 12]  # keep=2 of 2, 4, 10, 12; no partial save left behind
    assert sorted(os.listdir(ckdir)) == ["ckpt_00000010", "ckpt_00000012"]
    msg = str(info.value)
    assert "ckpt_00000018" in msg and "No space left" in msg and "ckpt_00000012" in msg
    assert "run.max_save_failures=2" in msg
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("cannot write checkpoint" in e and "training continues" in e
               for e in errors) == 4
    assert any("final checkpoint not written" in e and "ckpt_00000018" in e for e in errors)
    step, tree, extra = good.restore()
    assert step == 12 and extra["env_steps"] == 12
    assert int(tree["replay"]["num_added"]) == 6  # 6 steps of each of the 2 envs
    # The run resumes from the latest checkpoint once the disk has space again.
    monkeypatch.undo()
    again = Trainer(_smoke(tmp_path / "run"), stop_after_env_steps=20)
    out = again.run()
    assert out["env_steps"] == 20 and again.replay.num_added == 20
    assert Checkpointer(ckdir).steps() == [12, 20]


# ---------------------------------------------------------------------- SIGKILL at any moment
_KILL_SCRIPT = """
import logging, os, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # restarts load them all
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from experiments import ball_in_cup
from dali_jax.training.train import train
cfg = ball_in_cup.get_config("smoke")
cfg.method = "dreamer_dr"
cfg.logdir = {logdir!r}
cfg.run.steps = {steps}
cfg.run.save_every_s = {save_every_s}
cfg.run.log_every_s = 0.0  # metrics.jsonl: the env steps reached before a kill
train(cfg)
print("TRAINING DONE", flush=True)
"""

_RESUMED = re.compile(r"resumed from \S*ckpt_(\d+) at (\d+) env steps")


def _newest_intact(ckdir):
    """(step, replay steps per env) of the newest checkpoint that restores, or (0, 0)."""
    if not os.path.isdir(ckdir):
        return 0, 0
    ck = Checkpointer(ckdir)
    for step in reversed(ck.steps()):
        try:
            _, tree, extra = ck.restore(step=step)
        except CheckpointError:
            continue
        return int(extra["env_steps"]), int(tree["replay"]["num_added"])
    return 0, 0


def _reached(logdir, since):
    """Env steps a run started at time `since` has logged (metrics.jsonl gets a record every
    iteration; earlier records are those of killed runs, until the run purges them)."""
    path = os.path.join(logdir, "metrics.jsonl")
    steps = [0]
    if os.path.exists(path):
        for line in open(path):
            try:
                rec = json.loads(line)
                if rec["time"] >= since:
                    steps.append(int(rec["step"]))
            except (ValueError, KeyError):
                pass
    return max(steps)


def _partials(ckdir):
    """Partial saves being written (not deletions of old checkpoints)."""
    try:
        names = os.listdir(ckdir)
    except FileNotFoundError:
        return []
    return [n for n in names if ".orbax-checkpoint-tmp" in n]


def test_sigkill_at_random_moments_resumes_from_the_newest_intact_checkpoint(tmp_path):
    steps, num_envs, save_every_s = 300, 2, 0.3
    logdir = str(tmp_path / "run")
    ckdir = os.path.join(logdir, "checkpoints")
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT.format(logdir=logdir, steps=steps,
                                          save_every_s=save_every_s))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
    # Kill moments: 3 random env steps of the run (+ up to 0.3 s); at one of them the kill
    # waits for a checkpoint write in flight. Seeded, so a failure can be replayed.
    rng = random.Random(18)
    targets = sorted(rng.sample(range(20, steps - 100, num_envs), 3))
    mid = rng.randrange(3)
    plan = [(t, i == mid, rng.uniform(0.0, 0.3)) for i, t in enumerate(targets)]
    deadline = time.monotonic() + 420  # the whole test, whatever happens
    kills, resumed_at = [], 0
    for attempt in range(8):
        err_path = tmp_path / f"stderr_{attempt}.txt"
        started = time.time()
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                    stderr=err, env=env, cwd=str(tmp_path), text=True)
        partial_before = None
        try:
            if plan:
                target, in_write, delay = plan[0]
                reached_at = None
                while proc.poll() is None and time.monotonic() < deadline:
                    if reached_at is None:
                        if _reached(logdir, started) >= target:
                            reached_at = time.monotonic()
                    elif in_write and _partials(ckdir):
                        break
                    elif not in_write and time.monotonic() - reached_at >= delay:
                        break
                    time.sleep(0.001 if reached_at and in_write else 0.02)
                assert proc.poll() is None, "the run ended before its kill"
                partial_before = _partials(ckdir)
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        text = err_path.read_text()
        # Every start resumed from the newest checkpoint intact after the previous kill.
        got = _RESUMED.search(text)
        if resumed_at:
            assert got and int(got.group(2)) == resumed_at, (resumed_at, text[-2000:])
        else:
            assert got is None
        if partial_before is None:
            break  # no kill planned: the run finished
        # killed while a save was being written: the partial save it left is still there
        during_write = bool(set(partial_before) & set(_partials(ckdir)))
        if during_write or not plan[0][1]:  # else the save completed first: kill again
            plan.pop(0)
        reached = max(_reached(logdir, started), resumed_at)
        newest, replay_per_env = _newest_intact(ckdir)
        # The replay of that checkpoint holds every env step up to it: a kill loses only
        # the steps since the checkpoint.
        assert replay_per_env * num_envs == newest <= reached
        if during_write:  # the interrupted save is ignored: an older one is the newest
            assert all(int(n[len("ckpt_"):].split(".")[0]) >= newest for n in partial_before)
        kills.append(dict(reached=reached, resumed_at=newest, lost=reached - newest,
                          during_write=during_write))
        resumed_at = newest
    out = proc.stdout.read()
    assert proc.returncode == 0 and "TRAINING DONE" in out, text[-3000:]
    assert len(kills) >= 3 and sum(k["during_write"] for k in kills) >= 1, kills
    step, tree, extra = Checkpointer(ckdir).restore()
    assert step == steps and extra["env_steps"] == steps
    assert int(tree["replay"]["num_added"]) * num_envs == steps  # no hole in the replay
    summary = json.load(open(os.path.join(logdir, "eval_summary.json")))
    assert summary["env_steps"] == steps and not summary["stopped"]
    lost = [k["lost"] for k in kills]
    report = (f"SIGKILL test: {len(kills)} kills "
              f"({sum(k['during_write'] for k in kills)} during a checkpoint write) of a "
              f"{steps}-step smoke run saving every {save_every_s} s, at env steps "
              f"{[k['reached'] for k in kills]}, resumed from "
              f"{[k['resumed_at'] for k in kills]}: env steps lost per kill {lost} "
              f"(mean {np.mean(lost):.1f}, max {max(lost)}), {attempt + 1} starts; "
              f"kills during a write: {[k['during_write'] for k in kills]}")
    print(report)


# ------------------------------------------------------------------------- extreme contexts
def _grid_extremes(task):
    """Corners and edge midpoints of the task's evaluation grid: {id: context}. The grid's
    factor ranges are [min, max] of its values; the midpoint of an edge is the default."""
    from dali_jax.envs import contexts as C

    f0, f1 = C.FACTORS[task]
    grid = C.evaluation_grid(task)
    lo0, hi0 = min(g.values[f0] for g in grid), max(g.values[f0] for g in grid)
    lo1, hi1 = min(g.values[f1] for g in grid), max(g.values[f1] for g in grid)
    d0, d1 = C.DEFAULTS[task][f0], C.DEFAULTS[task][f1]
    points = [(lo0, lo1), (lo0, hi1), (hi0, lo1), (hi0, hi1),
              (d0, lo1), (d0, hi1), (lo0, d1), (hi0, d1)]
    return {i: {f0: a, f1: b} for i, (a, b) in enumerate(points)}


@pytest.mark.parametrize("task", ["ball_in_cup", "walker"])
def test_extreme_contexts_complete_an_episode(task):
    """One episode of an untrained DALI-D agent's sampled actions at each of the 8 extreme
    points of the grid: 1000 steps on features, and 100 steps rendering pixels too (3-4 ms
    a frame here; the agent acts on the features, so one compiled policy serves both)."""
    import functools

    from tests.helpers import tiny_config
    from dali_jax.agent import Agent, Spec
    from dali_jax.envs.context_env import PhysicsInstabilityWarning
    from dali_jax.envs.dmc import make_env
    from dali_jax.envs.vector import VectorEnv
    from dali_jax.training.setup import env_spec

    contexts = _grid_extremes(task)
    assert len({tuple(c.values()) for c in contexts.values()}) == 8
    agent = params = None
    for obs_mode, length in (("features", 1000), ("both", 100)):
        venv = VectorEnv([functools.partial(make_env, task, {i: c}, obs_mode=obs_mode, seed=i,
                                            time_limit=length) for i, c in contexts.items()],
                         parallel=False)
        try:
            if agent is None:
                spec = Spec(obs=env_spec(venv.observation_space),
                            action_dim=int(np.prod(venv.action_space.shape)))
                agent = Agent(tiny_config("dali_d", task=task), spec)
                init = jax.jit(agent.init, compiler_options=agent.compiler_options)
                params = init(jax.random.PRNGKey(0)).params
            carry = agent.initial_carry(params, venv.num_envs)
            key = jax.random.PRNGKey(1)
            obs, done, finished = venv.reset(), np.zeros(venv.num_envs, bool), []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                while not done.all():
                    key, sub = jax.random.split(key)
                    action, carry = agent.policy_step(params, carry, obs, sub)
                    obs, ended = venv.step(np.asarray(action))
                    finished += [e for e in ended if not done[e.env_index]]
                    done |= obs["is_last"]
                    for k in ("obs", "reward", "context"):
                        assert np.isfinite(obs[k]).all(), (k, obs[k])
                    if obs_mode == "both":
                        assert obs["image"].shape == (8, 64, 64, 3)
        finally:
            venv.close()
        assert sorted(e.env_index for e in finished) == list(range(8))
        unstable = [e for e in finished if e.unstable]
        for e in finished:
            assert e.error is None, (e.context, e.error)  # no exception in the env
            # the time limit, or an instability: truncated, with a warning
            assert e.truncated and (e.length == length or e.unstable), e
        instability_warnings = [w for w in caught
                                if issubclass(w.category, PhysicsInstabilityWarning)]
        assert len(instability_warnings) >= len(unstable)
        print(f"{task} {obs_mode}: {len(finished)} extreme contexts, lengths "
              f"{sorted(e.length for e in finished)}, unstable {len(unstable)}")


# ------------------------------------------------------------------ damaged run directories
def test_report_names_a_truncated_returns_json_and_reports_the_others(tmp_path, capsys):
    from dali_jax.analysis import report as RP
    from tests.helpers import write_run

    dirs = [write_run(tmp_path / "runs", setting="single_0", seed=s) for s in (0, 1, 2)]
    bad = dirs[1] / "eval" / "returns.json"
    text = bad.read_text()
    bad.write_text(text[:len(text) // 2])  # cut by a full disk or a crash
    out = tmp_path / "out"
    argv = [*map(str, dirs), "--out", str(out), "--reps", "50", "--assume-random-zero",
            "--no-plots"]
    assert RP.main(argv) == 2  # by default an error naming the file
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-damaged" in err and not out.exists()
    assert RP.main(argv + ["--skip-damaged"]) == 0
    err = capsys.readouterr().err
    assert f"skipped damaged run: {bad}" in err
    md = (out / "summary.md").read_text()
    assert f"Skipped (damaged results): {bad}" in md
    assert "| dali | features | single_0 | 0, 2 |" in md  # the other two seeds
    bad.unlink()  # missing results are named the same way
    assert RP.main(argv + ["--skip-damaged"]) == 0
    assert str(bad) in capsys.readouterr().err


def test_evaluate_names_a_run_without_checkpoint_and_evaluates_the_others(
        tmp_path_factory, tmp_path, capsys):
    from tests.helpers import smoke_run
    from dali_jax.analysis import evaluate as ev

    good = tmp_path / "good"
    shutil.copytree(smoke_run(tmp_path_factory), good)
    shutil.rmtree(good / "eval", ignore_errors=True)
    lost = tmp_path / "lost"  # its checkpoints were deleted
    shutil.copytree(good, lost)
    shutil.rmtree(lost / "checkpoints")
    corrupt = tmp_path / "corrupt"  # its checkpoint was cut
    shutil.copytree(good, corrupt)
    (ck,) = [d for d in (corrupt / "checkpoints").iterdir()]
    cut = max((p for p in (ck / "agent").rglob("*") if p.is_file()), key=os.path.getsize)
    with open(cut, "r+b") as f:
        f.truncate(100)
    argv = ["--episodes", "1", "--contexts", "0", "--episode-length", "5", "--num-envs", "1",
            "--serial", "--quiet"]
    assert ev.main(["--logdir", str(lost), str(corrupt), str(good), *argv]) == 2
    err = capsys.readouterr().err
    assert f"{lost} not evaluated" in err and "has no checkpoint" in err
    assert f"{corrupt} not evaluated" in err and cut.name in err
    assert f"2 of 3 runs not evaluated: {lost}, {corrupt}" in err
    assert (good / "eval" / "returns.json").is_file()  # the good run after them evaluated
    assert not (lost / "eval").exists() and not (corrupt / "eval").exists()

"""Trainer: resume without lost transitions, clear checkpoint errors, launch-time config
validation, experiment presets, and the data-parallel update on four forced CPU devices."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dali_jax import config as config_lib  # noqa: E402
from dali_jax import overrides  # noqa: E402
from dali_jax.training.checkpoint import CheckpointError  # noqa: E402
from dali_jax.training.train import Trainer  # noqa: E402
from experiments import ball_in_cup, walker_walk  # noqa: E402


def _smoke(logdir, method="dreamer_dr", steps=400):
    cfg = ball_in_cup.get_config("smoke")
    cfg.method = method
    cfg.logdir = str(logdir)
    cfg.run.steps = steps
    cfg.run.save_every_s = 1e9
    return cfg


def test_interrupted_run_resumes_without_lost_transitions(tmp_path):
    cfg = _smoke(tmp_path / "run")
    # Any implicit host<->device transfer in the acting/update hot path is an error.
    cfg.run.transfer_guard = "disallow"
    cfg.run.eval_every = 200  # one evaluation in each half; the second at the last step
    first = Trainer(cfg, stop_after_env_steps=240).run()
    assert first["stopped"] and first["env_steps"] == 240
    assert not os.path.exists(tmp_path / "run" / "eval_summary.json")
    second = Trainer(cfg)
    out = second.run()
    assert out["env_steps"] == 400 and not out["stopped"]
    # every env step of both halves is in the replay
    assert second.replay.num_added == 400 and len(second.replay) == 400
    # updates: ratio 16 / (4 * 16) = 0.25 per env step after the 100-step prefill
    assert out["updates"] == pytest.approx(0.25 * (400 - 100), abs=2)
    summary = json.load(open(tmp_path / "run" / "eval_summary.json"))
    assert "eval/return_mean" in summary
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert max(l["step"] for l in lines) == 400
    # The evaluation at the last step is the final one: logged once, not run again.
    evals = [l for l in lines if "eval/return_mean" in l]
    assert [l["step"] for l in evals] == [200, 400]
    assert summary["eval/return_mean"] == evals[-1]["eval/return_mean"]


def test_corrupt_and_incompatible_checkpoints_raise_naming_the_file(tmp_path):
    cfg = _smoke(tmp_path / "run", steps=120)
    Trainer(cfg).run()
    ckdir = tmp_path / "run" / "checkpoints"
    (ck,) = [d for d in os.listdir(ckdir) if d.startswith("ckpt_")]
    # incompatible: another model size on the same logdir
    other = _smoke(tmp_path / "run", steps=200)
    other.model.size = "tiny"
    with pytest.raises(CheckpointError, match=ck):
        Trainer(other).run()
    # corrupt: truncate the largest file of the replay
    cut = max((p for p in (ckdir / ck / "replay").rglob("*") if p.is_file()),
              key=os.path.getsize)
    with open(cut, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=f"{ck}.*{cut.name}.*truncated"):
        Trainer(_smoke(tmp_path / "run", steps=200)).run()


def test_benchmark_variants_carry_config_overrides_after_at():
    """`NAME@key=value;...` as the benchmarks' --methods / --options take it."""
    assert overrides.split_variant("dali_d") == ("dali_d", [])
    assert overrides.split_variant("dali_d@context.hidden=32; context.loss=inverse;") == (
        "dali_d", ["--config.context.hidden=32", "--config.context.loss=inverse"])
    c = overrides.apply_variant(ball_in_cup.get_config(), "x@context.hidden=32", "--methods")
    assert c.context.hidden == 32 and isinstance(c.context.hidden, int)
    with pytest.raises(SystemExit, match="--methods x@context.hiden=3: unknown field"):
        overrides.apply_variant(ball_in_cup.get_config(), "x@context.hiden=3", "--methods")


def test_launch_rejects_bad_overrides_and_presets_hold_the_protocol():
    with pytest.raises(overrides.UsageError, match="Valid fields: .*method"):
        overrides.parse(ball_in_cup.get_config, ["--config.methd=dali_d"], ball_in_cup.PRESETS)
    with pytest.raises(overrides.UsageError, match=r"flag --config.seed=three: invalid literal "
                                                   r"for int\(\)"):
        overrides.parse(ball_in_cup.get_config, ["--config.seed=three"], ball_in_cup.PRESETS)
    with pytest.raises(overrides.UsageError, match="--config.run is a group; set one of its "
                                                   "fields: .*steps"):
        overrides.parse(ball_in_cup.get_config, ["--config.run=3"], ball_in_cup.PRESETS)
    with pytest.raises(overrides.UsageError, match="unknown argument 'extra'"):
        overrides.parse(ball_in_cup.get_config, ["--config.seed", "3", "extra"],
                        ball_in_cup.PRESETS)
    # values in either form, typed by the field's default; later ones win
    c = overrides.parse(ball_in_cup.get_config, [
        "--config.seed", "3", "--config.run.train_ratio=64", "--config.context.residual=true",
        "--config.seed=4", "--config.context.alignment=custom"], ball_in_cup.PRESETS)
    assert (c.seed, c.run.train_ratio, c.context.residual) == (4, 64.0, True)
    assert isinstance(c.run.train_ratio, float)
    with pytest.raises(ValueError, match="config.xla_opt_level must be one of -1, 0, 1, 2, 3"):
        overrides.parse(ball_in_cup.get_config, ["--config.xla_opt_level=5"], ball_in_cup.PRESETS)
    with pytest.raises(ValueError, match="config.obs must be one of features, pixels"):
        overrides.parse(ball_in_cup.get_config, ["--config.obs=rgb"], ball_in_cup.PRESETS)
    with pytest.raises(overrides.UsageError, match="preset must be one of"):
        overrides.parse(ball_in_cup.get_config, ["--preset=huge"], ball_in_cup.PRESETS)
    # the first-contact preset is the cpu preset with DALI-D, gravity varied and the
    # project's alignment recipe
    cpu = overrides.parse(ball_in_cup.get_config, ["--preset=cpu"], ball_in_cup.PRESETS)
    first = overrides.parse(ball_in_cup.get_config, ["--preset=first"], ball_in_cup.PRESETS)
    assert (first.method, first.context_setting) == ("dali_d", "single_0")
    assert (cpu.context.alignment, first.context.alignment) == ("paper", "project")
    cpu.method, cpu.context_setting = first.method, first.context_setting
    config_lib.set_alignment(cpu, "project")
    assert first.to_dict() == cpu.to_dict()
    for bad, msg in (("--config.context.readout=sum", "config.context.readout must be one of "
                      "flatten, mean"),
                     ("--config.context.history=-2", "config.context.history must be -1"),
                     ("--config.context.hidden=-1", "config.context.hidden must be 0"),
                     ("--config.context.stats_decay=1.0", "config.context.stats_decay must"),
                     ("--config.model.conv_impl=fft", "config.model.conv_impl must be one of "
                      "auto, native, matmul"),
                     ("--config.context.head_layers=0", "config.context.head_layers must be"),
                     ("--config.context.inverse_weight=0", "config.context.inverse_weight must"),
                     ("--config.context.release_compat=true", "whose alignment loss is forward")):
        with pytest.raises(ValueError, match=msg):
            overrides.parse(ball_in_cup.get_config, ["--config.context.alignment=project", bad],
                         ball_in_cup.PRESETS)
    c = overrides.parse(ball_in_cup.get_config, ["--config.method=dali_d", "--config.obs=pixels",
                                              "--config.seed", "3",
                                              "--config.context_setting=double_box"],
                     ball_in_cup.PRESETS)
    assert (c.method, c.obs, c.seed, c.context_setting) == ("dali_d", "pixels", 3, "double_box")
    assert (c.run.steps, c.run.train_ratio, c.run.num_envs, c.model.size) == (
        200_000, 512.0, 4, "small")
    w = walker_walk.get_config()
    assert (w.task, w.run.steps) == ("walker", 500_000)
    assert c.train.batch_size == 16 and c.train.batch_length == 64 and c.context.window == 64


_DP_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from tests.helpers import tiny_config, feature_spec, random_batch
    from dali_jax.agent import Agent
    from dali_jax.training import parallel
    assert len(jax.devices()) == 4
    agent = Agent(tiny_config("dali_d"), feature_spec())
    batch = random_batch(agent.spec)
    key = jax.random.PRNGKey(3)
    s1, m1 = agent.train_step(agent.init(jax.random.PRNGKey(0)), batch, key)
    mesh = parallel.make_mesh(0)
    step = parallel.sharded_train_step(agent, mesh, 4)
    rep, data = parallel.shardings(mesh)
    st = parallel.replicate(agent.init(jax.random.PRNGKey(0)), mesh)
    s2, m2 = step(st, jax.device_put(batch, data), key)
    assert len(s2.params["actor"]["out"]["kernel"].sharding.device_set) == 4
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2))]
    mets = [abs(float(m1[k]) - float(m2[k])) / (1 + abs(float(m1[k]))) for k in m1]
    print("MAXDIFF", max(diffs), "METDIFF", max(mets))
""")


def test_data_parallel_update_equals_single_device(tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(_DP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)  # the child imports tests.helpers
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("MAXDIFF")][0]
    maxdiff, metdiff = float(line.split()[1]), float(line.split()[3])
    assert maxdiff < 1e-4 and metdiff < 1e-3, line


def test_prefill_actions_are_held_for_prefill_hold_steps():
    from dali_jax.training.setup import prefill_action
    low, high = np.array([-1.0, -0.5]), np.array([1.0, 0.5])
    acts = np.stack([prefill_action(3, t, 10, low, high, (4, 2)) for t in range(40)])
    assert acts.shape == (40, 4, 2) and acts.dtype == np.float32
    assert np.all(acts >= low) and np.all(acts <= high)
    for block in range(4):  # constant within a block of 10 control steps ...
        block_acts = acts[block * 10:(block + 1) * 10]
        np.testing.assert_array_equal(block_acts, np.repeat(block_acts[:1], 10, 0))
    assert np.all(acts[0] != acts[10]) and np.all(acts[10] != acts[20])  # ... new across blocks
    assert len({tuple(a) for a in acts[0]}) == 4  # each env its own action
    np.testing.assert_array_equal(acts[17], prefill_action(3, 17, 10, low, high, (4, 2)))  # resumable
    iid = np.stack([prefill_action(3, t, 1, low, high, (4, 2)) for t in range(3)])
    assert np.all(iid[0] != iid[1])  # hold 1: a new draw every step


def test_replay_holds_the_executed_actions(tmp_path):
    """What the env executed is what the replay stores (world model, context tokens and
    inverse targets learn from it): the prefill's held random actions during prefill, then
    the policy's samples clipped to the action bounds."""
    from dali_jax.envs.dmc import make_env

    received = {}

    def factory(contexts, obs_mode, seed, time_limit):
        env = make_env("ball_in_cup", contexts, obs_mode=obs_mode, seed=seed,
                       time_limit=time_limit)
        log, step = received.setdefault(seed, []), env.step

        def recording(action):
            log.append(np.array(action, np.float32))
            return step(action)
        env.step = recording
        return env

    cfg = _smoke(tmp_path / "run", method="dali_d", steps=240)
    cfg.run.prefill_hold = 4
    cfg.run.transfer_guard = "disallow"  # DALI-D's acting window: no hidden transfer either
    trainer = Trainer(cfg, env_factory=factory)
    trainer.run()
    data = trainer.replay.state_dict()
    stored = data["data/action"]  # (num_envs, steps, A)
    prefill = cfg.run.prefill // cfg.run.num_envs
    for i in range(cfg.run.num_envs):
        # after is_last the vector env resets instead of stepping: that action is not run
        ran = stored[i][~data["data/is_last"][i]]
        got = np.stack(received[cfg.seed * 1000 + i])
        np.testing.assert_array_equal(ran, got[:len(ran)])
    assert np.abs(stored).max() <= 1.0
    # prefill: held for prefill_hold steps, never at the bounds; policy: clipped samples
    assert (stored[:, 1:4] == stored[:, :1]).all()
    assert not (np.abs(stored[:, :prefill]) == 1.0).any()
    assert (np.abs(stored[:, prefill:]) == 1.0).any()


def test_runs_written_before_a_new_option_load_with_its_default(tmp_path):
    """config.json of an older run (fields missing) loads over today's defaults, keeping
    every value the run saved."""
    import json

    from dali_jax import config as config_lib
    from dali_jax.training.load import load_config
    c = config_lib.get_config()
    c.method, c.model.size, c.context.window = "dali_d", "tiny", 32
    saved = c.to_dict()
    del saved["model"]["conv_impl"], saved["context"]["history"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = load_config(str(tmp_path))
    config_lib.validate(loaded)
    assert (loaded.method, loaded.model.size, loaded.context.window) == ("dali_d", "tiny", 32)
    assert (loaded.model.conv_impl, loaded.context.history) == ("auto", -1)

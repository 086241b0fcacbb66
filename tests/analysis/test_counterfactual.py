"""Counterfactual imagination on a tiny trained checkpoint: non-empty images, a difference that
is non-zero for a non-zero shift and exactly zero for a zero shift, the summary, and clear
errors for bad input."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import smoke_run
from dali_jax.analysis import counterfactual as cf

FAST = ["--windows", "6", "--horizon", "6", "--episodes", "1", "--episode-length", "24",
        "--fast", "--bootstrap", "100", "--quiet", "--check-scales=-2,0,2", "--check-starts",
        "3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return smoke_run(tmp_path_factory)


def _image(path):
    assert os.path.getsize(path) > 0
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 10 and img.shape[1] > 10 and img.std() > 0
    return img


def test_counterfactual_outputs_and_zero_shift(run_dir, tmp_path):
    out3, out0 = tmp_path / "s3", tmp_path / "s0"
    assert cf.main(["--logdir", run_dir, "--dim", "auto", "--scale", "3", "--out", str(out3)]
                   + FAST) == 0
    s3 = json.load(open(out3 / "summary.json"))
    d = s3["dim"]
    assert s3["dim_mode"] == "auto" and s3["context_dims"] == 2 and 0 <= d < 2
    inf = s3["influence"]
    assert len(inf["auc"]) == 2 and d == int(np.argmax(inf["auc"]))
    for a, lo, hi in zip(inf["auc"], inf["ci_low"], inf["ci_high"]):
        assert 0 <= lo <= hi <= 1 and 0 <= a <= 1
    assert set(inf["per_classifier"][0]) == {"svc_rbf", "mlp", "adaboost"}
    assert len(s3["sigma"]) == 2 and all(x > 0 for x in s3["sigma"])
    pc = s3["physical_check"]
    assert pc["dim"] == d and pc["scales_sigma"] == [-2.0, 0.0, 2.0] and pc["ball_vz_index"] == 7
    assert (pc["starts"], pc["steps"], pc["samples"]) == (3, 4, 8)
    sw = pc["context_swap"]
    assert sw["gravities"] == [4.905, 7.3575, 9.81, 12.2625, 14.715] and sw["starts"] == 3
    for sweep in ("context", "state", "matched"):
        assert len(sw[sweep]["mean_acceleration"]) == 5
        assert np.isnan(sw[sweep]["spearman_rho"]) or -1 <= sw[sweep]["spearman_rho"] <= 1
    assert -1 <= pc["spearman_rho"] <= 1 and set(pc["spearman_rho_per_dim"]) == {"0", "1"}
    for name in (f"strip_dim{d}.png", f"timeseries_dim{d}.png", "influence_auc.png",
                 "physical_check.png"):
        _image(out3 / name)
    z3 = np.load(out3 / f"decoded_dim{d}.npz")
    assert z3["baseline"].shape == (6, 8) and np.all(np.isfinite(z3["baseline"]))
    assert np.abs(z3["difference"]).max() > 1e-4
    np.testing.assert_array_equal(z3["difference"], z3["baseline"] - z3["counterfactual"])

    assert cf.main(["--logdir", run_dir, "--dim", str(d), "--scale", "0", "--out", str(out0)]
                   + FAST) == 0
    s0 = json.load(open(out0 / "summary.json"))
    assert s0["dim"] == d and s0["dim_mode"] == "given"
    assert s0["influence"]["auc"] == [0.5, 0.5]  # identical trajectories
    z0 = np.load(out0 / f"decoded_dim{d}.npz")
    _image(out0 / f"strip_dim{d}.png")
    assert np.all(z0["difference"] == 0)
    np.testing.assert_array_equal(z0["baseline"], z0["counterfactual"])
    # same seed -> same episodes, windows and random keys: the same baseline
    np.testing.assert_array_equal(z0["baseline"], z3["baseline"])
    assert s0["sigma"] == s3["sigma"]


def test_bad_input_gives_clear_errors(run_dir, tmp_path, capsys):
    def err(argv):
        assert cf.main(argv) == 2
        return capsys.readouterr().err

    assert "no such run directory" in err(["--logdir", str(tmp_path / "nope")])
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), empty / "config.json")
    assert "has no checkpoint" in err(["--logdir", str(empty)] + FAST)
    msg = err(["--logdir", run_dir, "--dim", "2"] + FAST)
    assert "--dim 2 is out of range" in msg and "valid 0..1" in msg
    assert "out of range" in err(["--logdir", run_dir, "--dim", "-1"] + FAST)
    assert "--dim must be 'auto' or an integer" in err(["--logdir", run_dir, "--dim", "x"])
    assert "is a ball_in_cup run, not walker" in err(
        ["--logdir", run_dir, "--task", "walker"] + FAST)
    assert "--windows must be >= 5" in err(["--logdir", run_dir, "--windows", "3"])
    # a run whose method has no context
    dr = tmp_path / "dreamer"
    dr.mkdir()
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    cfg["method"] = "dreamer_dr"
    json.dump(cfg, open(dr / "config.json", "w"))
    assert "'dreamer_dr' has no context" in err(["--logdir", str(dr)] + FAST)
    # episodes too short for the context window (K = 8)
    assert "too short" in err(["--logdir", run_dir, "--episode-length", "5", "--windows", "5"])


def _untrained_pixel_run(logdir):
    """An untrained DALI-S pixel run (config.json + one checkpoint of the initial state)."""
    import jax

    from tests.helpers import smoke_config
    from dali_jax.agent import Agent
    from dali_jax.training.checkpoint import Checkpointer
    from dali_jax.training.load import spec_for

    cfg = smoke_config(logdir, method="dali_s")
    cfg.obs = "pixels"
    os.makedirs(logdir)
    with open(os.path.join(logdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
    agent = Agent(cfg, spec_for(cfg))
    state = jax.jit(agent.init)(jax.random.PRNGKey(0))
    Checkpointer(os.path.join(logdir, "checkpoints")).save(0, dict(agent=state.state_dict()))
    return str(logdir)


def test_pixel_run_strips_and_gif(tmp_path):
    run = _untrained_pixel_run(tmp_path / "pix")
    args = ["--logdir", run, "--dim", "1", "--frames", "4"] + FAST
    # The untrained g_phi's context barely varies between windows (sigma ~ 1e-5), and DALI-S
    # reads c only through the start posterior's one-hot sample: a shift of 3 sigma changes
    # no sample (the frames differ by float rounding at most). Shift c by about 10 instead.
    assert cf.main(args + ["--scale", "1e6", "--out", str(tmp_path / "s3")]) == 0
    assert cf.main(args + ["--scale", "0", "--out", str(tmp_path / "s0")]) == 0
    s3 = json.load(open(tmp_path / "s3" / "summary.json"))
    assert s3["obs"] == "pixels" and s3["physical_check"] is None
    for name in ("s3", "s0"):
        strip = _image(tmp_path / name / "strip_dim1.png")
        assert strip.shape == (3 * 64, 4 * 64, 3)  # baseline / counterfactual / difference
        gif = Image.open(tmp_path / name / "cf_dim1.gif")
        assert gif.n_frames == 6 and gif.size == (2 * 3 * 64, 2 * 64)
    z3 = np.load(tmp_path / "s3" / "decoded_dim1.npz")
    z0 = np.load(tmp_path / "s0" / "decoded_dim1.npz")
    assert z3["baseline"].shape == (6, 64, 64, 3)
    assert np.abs(z3["difference"]).max() > 1e-4
    assert np.all(z0["difference"] == 0)
    diff_row = _image(tmp_path / "s0" / "strip_dim1.png")[128:]
    assert np.all(diff_row == 128)  # (b - c + 1) / 2 = 0.5 everywhere
    if np.abs(z3["difference"]).max() > 2 / 255:
        assert np.any(_image(tmp_path / "s3" / "strip_dim1.png")[128:] != 128)

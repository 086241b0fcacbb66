"""Learning curves from metrics.jsonl, checked against hand-computed values."""
import json

import pytest

from dali_jax.analysis import curves


def _write(tmp_path, records, tail=""):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


def test_curve_from_records(tmp_path):
    recs = [
        {"step": 4000, "time": 100.0, "episode/return": 0.0},
        {"step": 4000, "time": 100.0, "episode/return": 300.0},
        {"step": 9996, "time": 150.0, "episode/return": 600.0},
        {"step": 10000, "time": 160.0, "eval/return_mean": 250.0},
        {"step": 12000, "time": 170.0, "loss/actor": 1.0},
        {"step": 14000, "time": 200.0, "episode/return": 900.0},
        {"step": 20000, "time": 390.0, "eval/return_mean": 850.5},
        {"step": 20000, "time": 400.0, "eval/return_mean": 850.5},  # repeated final eval
    ]
    # A line cut by a crash at the end is skipped.
    _write(tmp_path, recs, tail='{"step": 20004, "episode/re')
    c = curves.load_curve(tmp_path, bin_size=10_000)
    assert c.eval_steps == [10000, 20000]
    assert c.eval_returns == [250.0, 850.5]
    assert c.last_eval == 850.5
    assert c.bin_size == 10_000
    # bin 0: (0 + 300 + 600) / 3 = 300 over 3 episodes; bin 1: 900 over 1
    assert c.bins == [(0, 300.0, 3), (10000, 900.0, 1)]
    assert c.wall_s == pytest.approx(300.0)
    assert c.last_step == 20000
    text = curves.format_curve(c)
    assert "last evaluation 850" in text and "10k 250" in text and "0k 300 (n=3)" in text

    out = tmp_path / "out"
    assert curves.main([str(tmp_path), "--bin", "5000", "--out", str(out)]) == 0
    rows = (out / "curves.csv").read_text().splitlines()
    assert rows[0] == "run,kind,env_step,return,episodes"
    # 5k bins: [0, 5k): 0, 300 -> 150; [5k, 10k): 600; [10k, 15k): 900
    train = [r.split(",") for r in rows if ",train_bin," in r]
    assert [(int(r[2]), float(r[3]), int(r[4])) for r in train] == [
        (0, 150.0, 2), (5000, 600.0, 1), (10000, 900.0, 1)]
    assert (out / "curves.png").stat().st_size > 1000


def test_missing_run_and_bad_bin(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        curves.load_curve(tmp_path / "nope")
    with pytest.raises(ValueError, match="bin_size"):
        curves.learning_curve([], bin_size=0)
    with pytest.raises(SystemExit):
        curves.main([str(tmp_path / "nope")])

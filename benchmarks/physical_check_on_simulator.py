"""The counterfactual physical check's estimator on the Ball-in-Cup simulator: does the ball's
vertical acceleration under zero actions follow gravity?

    python benchmarks/physical_check_on_simulator.py [--episodes 8] [--steps 5] [--horizon 64]

Episodes reset at each gravity of the training range (4.9 ... 14.7), zero actions; prints
Spearman rho between gravity and (a) the acceleration over the first `--steps` second
differences after the reset (free fall: the estimator `dali_jax.analysis.physical_check` uses)
and (b) the mean acceleration over `--horizon` steps, with the mean per gravity.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")

from dali_jax.analysis.physical_check import simulator_check  # noqa: E402

GRAVITIES = (4.9, 7.35, 9.81, 12.25, 14.7)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--horizon", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    r = simulator_check(GRAVITIES, a.episodes, a.steps, a.horizon, a.seed)
    print(json.dumps(r, indent=1))

"""Ball-in-Cup (catch) under gravity x string-length contexts.

Run:   python experiments/ball_in_cup.py [--preset paper|cpu|first|quick|smoke] [--config.FIELD=VALUE]
e.g.   python experiments/ball_in_cup.py --config.method=dali_d --config.obs=pixels \
           --config.seed=3 --config.context_setting=double_box
Load:  from experiments.ball_in_cup import get_config; get_config("paper")
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dali_jax import launch  # noqa: E402
from dali_jax import presets  # noqa: E402

PRESETS = presets.NAMES


def get_config(preset=None):
    """preset: None/"paper" (the DALI protocol: small model, train_ratio 512, 4 envs, the
    paper's alignment loss), "cpu", "first", "quick" or "smoke" (dali_jax/presets.py)."""
    return presets.experiment_config("ball_in_cup", preset)


if __name__ == "__main__":
    sys.exit(launch.main(get_config, PRESETS))

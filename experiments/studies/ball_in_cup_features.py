"""The paper's Ball-in-Cup featurized study: 6 methods x 10 seeds x 3 context settings
(180 runs of 200k env steps), each evaluated on the 84-context grid with 50 episodes.

    python -m dali_jax.study experiments/studies/ball_in_cup_features.py \
        --dir runs/studies/bic_features plan
    python -m dali_jax.study experiments/studies/ball_in_cup_features.py \
        --dir runs/studies/bic_features --backend slurm all
"""
from dali_jax.study import spec


def get_config():
    c = spec.defaults()  # the paper's protocol: 6 methods, 10 seeds, 3 settings, 84 x 50
    c.task = "ball_in_cup"
    c.obs = "features"
    c.overrides["context.alignment"] = "paper"  # the paper's alignment loss (the default)
    return c

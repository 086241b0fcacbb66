"""The paper's Walker (walk) featurized study: 6 methods x 10 seeds x 3 context settings
(180 runs of 500k env steps), each evaluated on the 84-context grid with 50 episodes.

Walker scores need expert returns: set `evaluation.expert_reference` to a reference file
(dali_jax.analysis.normalize format, kind "expert"); without it the report lists the runs and
curves but no normalised scores.

    python -m dali_jax.study experiments/studies/walker_features.py \
        --dir runs/studies/walker_features --backend slurm all
"""
from dali_jax.study import spec


def get_config():
    c = spec.defaults()  # the paper's protocol: 6 methods, 10 seeds, 3 settings, 84 x 50
    c.task = "walker"
    c.obs = "features"
    c.backend.slurm.time_min = 48 * 60
    c.overrides["context.alignment"] = "paper"  # the paper's alignment loss (the default)
    return c

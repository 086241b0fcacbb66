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
    c = spec.defaults()
    c.task = "walker"
    c.obs = "features"
    c.methods = ("dreamer_dr", "crssm_s", "crssm_d", "dali_s", "dali_s_chi", "dali_d")
    c.seeds = spec.RELEASE_SEEDS
    c.settings = ("single_0", "single_1", "double_box")
    c.preset = "paper"
    c.evaluation.episodes = 50
    c.evaluation.contexts = "all"
    c.evaluation.expert_reference = ""
    c.backend.slurm.time_min = 48 * 60
    c.backend.slurm.gpus_per_node = 1
    c.backend.slurm.cpus_per_task = 8
    c.backend.slurm.mem_gb = 32
    return c

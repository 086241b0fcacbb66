"""Confirmation study on fresh seeds, sized for a 2-core CPU: featurized Ball-in-Cup with
gravity varied in training (single_0), the `cpu` run preset (tiny model, g_phi 32 wide,
K = 32, 100k env steps), seeds 3-7, which chose no setting of the project: the presets, the
project's alignment recipe and g_phi's width were chosen on seeds 0-2.

Four methods at one commit: Dreamer-DR, cRSSM-D (the true gravity), DALI-D with the paper's
alignment loss (`dali_d_paper`) and DALI-D with this project's recipe (`dali_d_project`;
config.ALIGNMENTS). Each run is evaluated on the 14 gravities single_0 scores (4
interpolation, 10 extrapolation), 20 episodes each.

    python -m dali_jax.study experiments/studies/ball_in_cup_cpu_confirm.py --dir runs/studies/confirm plan
    python -m dali_jax.study experiments/studies/ball_in_cup_cpu_confirm.py --dir runs/studies/confirm all
"""
from dali_jax.study import spec


def get_config():
    c = spec.defaults()
    c.task = "ball_in_cup"
    c.obs = "features"
    c.variants["dali_d_paper"] = "dali_d"
    c.variants["dali_d_project"] = "dali_d"
    c.methods = ("dreamer_dr", "crssm_d", "dali_d_paper", "dali_d_project")
    c.method_overrides["dali_d_paper"] = {"context.alignment": "paper"}
    c.method_overrides["dali_d_project"] = {"context.alignment": "project"}
    c.seeds = (3, 4, 5, 6, 7)
    c.settings = ("single_0",)
    c.preset = "cpu"
    c.evaluation.episodes = 20
    c.evaluation.contexts = "scored"
    c.evaluation.num_envs = 20
    c.backend.name = "local"
    c.backend.local.concurrency = 2
    return c

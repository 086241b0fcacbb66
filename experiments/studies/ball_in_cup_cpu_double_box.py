"""Both factors varied, sized for a 2-core CPU: featurized Ball-in-Cup trained on the 2-D box
of gravity x string length (double_box), the `cpu` run preset (tiny model, g_phi 32 wide,
K = 32, 100k env steps), fresh seeds 8-10.

Three methods at one commit: Dreamer-DR, cRSSM-D (the true context) and DALI-D with the
project's alignment recipe: of the two DALI-D of the confirmation study
(experiments/studies/ball_in_cup_cpu_confirm.py), the one with the higher extrapolation IQM
on its seeds 3-6 (0.38 against 0.29 for the paper's loss), the seeds finished when this
study started. Each run is evaluated on all 84 grid contexts (double_box scores every one: inside
the box, one factor outside, both outside), 10 episodes each.

    python -m dali_jax.study experiments/studies/ball_in_cup_cpu_double_box.py --dir runs/studies/double_box all
"""
from dali_jax.study import spec


def get_config():
    c = spec.defaults()
    c.task = "ball_in_cup"
    c.obs = "features"
    c.variants["dali_d_project"] = "dali_d"
    c.methods = ("dreamer_dr", "crssm_d", "dali_d_project")
    c.method_overrides["dali_d_project"] = {"context.alignment": "project"}
    c.seeds = (8, 9, 10)
    c.settings = ("double_box",)
    c.preset = "cpu"
    c.evaluation.episodes = 10
    c.evaluation.contexts = "scored"
    c.evaluation.num_envs = 20
    c.backend.name = "local"
    c.backend.local.concurrency = 2
    return c

"""The exploratory CPU study of results/study_bic_cpu: featurized Ball-in-Cup, gravity varied
(single_0), Dreamer-DR vs cRSSM-D vs DALI-D, seeds 0-2, the `cpu` run preset, 20 episodes on
each of the 14 contexts single_0 scores, two runs at a time (one per core).

Its DALI-D runs use the inverse alignment recipe and a 64-wide g_phi, as they were run
(2026-12-05). Seeds 0-2 chose those settings (the inverse recipe over the paper's loss, then
the project's recipe, then g_phi's width), so this study does not test them: the
confirmation study on fresh seeds is experiments/studies/ball_in_cup_cpu_confirm.py.

    python -m dali_jax.study experiments/studies/ball_in_cup_cpu.py --dir runs/studies/bic_cpu plan
    python -m dali_jax.study experiments/studies/ball_in_cup_cpu.py --dir runs/studies/bic_cpu all
"""
from dali_jax.study import spec


def get_config():
    c = spec.defaults()
    c.task = "ball_in_cup"
    c.obs = "features"
    c.methods = ("dreamer_dr", "crssm_d", "dali_d")
    c.seeds = (0, 1, 2)
    c.settings = ("single_0",)
    c.preset = "cpu"
    c.method_overrides["dali_d"] = {"context.alignment": "inverse", "context.hidden": 64,
                                    "context.head_units": 64}
    c.evaluation.episodes = 20
    c.evaluation.contexts = "scored"
    c.evaluation.num_envs = 20
    c.backend.name = "local"
    c.backend.local.concurrency = 2
    return c

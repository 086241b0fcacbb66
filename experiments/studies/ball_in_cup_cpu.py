"""A study sized for a 2-core CPU: Ball-in-Cup featurized, gravity varied (single_0),
Dreamer-DR vs cRSSM-D vs DALI-D, 3 seeds, the `cpu` run preset (100k env steps: Dreamer-DR
first catches the ball at 40-70k steps there), 20 episodes on each of the 14 contexts
single_0 scores, two runs at a time (one per core).

Cost: one cpu-preset run takes 27 (Dreamer-DR) to about 41 (DALI-D, g_phi 64 wide; the preset
is 32 wide since the fifteenth session, 1.24x Dreamer-DR's loop) minutes on one core
(benchmarks/RESULTS.md), so 9 runs two at a time are about 2.5 h plus a few minutes of
evaluation; `plan` prints the estimate (measured figures replace it once runs have
started).

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
    # DALI-D aligns its context with the inverse-dynamics loss (the default of the
    # fourteenth and fifteenth sessions; kept explicit so the study's runs keep it): with
    # the paper's forward loss its context encodes the task's progress and DALI-D reached
    # 0.27x Dreamer-DR here; with the inverse loss 0.92x and 1.06x (seeds 0 and 2;
    # benchmarks/RESULTS.md). Today's default is forward + 30 x inverse.
    c.method_overrides["dali_d"] = {"context.loss": "inverse"}
    c.evaluation.episodes = 20
    c.evaluation.contexts = "scored"
    c.evaluation.num_envs = 20
    c.cost.train_steps_per_s = 55.0
    c.cost.eval_steps_per_s = 3000.0
    c.backend.name = "local"
    c.backend.local.concurrency = 2
    return c

"""The agent: `Agent` (networks, `init`, the pure `update` and its jit `train_step`,
`policy_step` for acting) and `Spec` (the problem's shapes).

- core.py: networks, the train state (`TrainState`) and `init`;
- update.py: the update (world model, then actor and critic; the non-finite guard);
- world_model.py: context inference on training sequences and the world-model loss;
- actor_critic.py: imagination and the actor and critic objectives;
- acting.py: the acting carry and one policy step.
"""
from dali_jax.agent.core import (MODEL_KEYS, Agent, Spec, TrainState, compute_dtype,
                                 count_params, make_optimizer, trained_param_count)

__all__ = ["MODEL_KEYS", "Agent", "Spec", "TrainState", "compute_dtype", "count_params",
           "make_optimizer", "trained_param_count"]

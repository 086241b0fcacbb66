"""``python -m dali_jax.counterfactual --logdir RUN [...]``: see
``dali_jax.analysis.counterfactual``."""
import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

from dali_jax.analysis.counterfactual import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python -m dali_jax.study STUDY_FILE --dir DIR {plan,run,status,evaluate,report,all}``."""
import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

from dali_jax.study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

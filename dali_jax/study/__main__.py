"""``python -m dali_jax.study STUDY_FILE --dir DIR {plan,run,status,evaluate,report,all}``."""
import sys

from dali_jax.study.cli import main

if __name__ == "__main__":
    sys.exit(main())

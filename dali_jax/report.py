"""``python -m dali_jax.report RUN_DIR... --out DIR``: see ``dali_jax.analysis.report``."""
import sys

from dali_jax.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m dali_jax.curves RUN... [--out DIR]``: see ``dali_jax.analysis.curves``."""
import sys

from dali_jax.analysis.curves import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The README's test command (what .ci/run runs). Installs what is needed (scripts/bootstrap.sh),
# then
#   1. the whole suite in .venv (Python 3.12 where there is one: the newest JAX);
#   2. a fast subset in .venv-oldest: Python 3.11 with the oldest supported versions
#      (scripts/oldest.txt), the API surface of jax, flax, optax, orbax and chex we rely on.
# With arguments, only step 1 runs, with the arguments passed to pytest
# (e.g. `bash scripts/test.sh tests/models/test_rssm.py -x`). DALI_SKIP_OLDEST=1 skips step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
cache="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
if [ $# -gt 0 ]; then
  JAX_COMPILATION_CACHE_DIR="$cache" exec .venv/bin/python -m pytest "$@"
fi
echo "[test] the whole suite on $(.venv/bin/python --version)"
JAX_COMPILATION_CACHE_DIR="$cache" .venv/bin/python -m pytest
[ "${DALI_SKIP_OLDEST:-0}" = 1 ] && exit 0
OLDEST_TESTS=(tests/test_imports.py tests/models/test_nets.py tests/models/test_rssm.py
              tests/models/test_distributions.py tests/models/test_context_encoder.py
              tests/training/test_checkpoint.py tests/training/test_windows.py)
source scripts/find_python.sh
py311="$(find_python 3.11 || true)"
if [ -z "$py311" ]; then
  echo "[test] no Python 3.11 here: the oldest-versions subset is skipped"
  exit 0
fi
echo "[test] the oldest supported versions (scripts/oldest.txt) on Python 3.11: ${OLDEST_TESTS[*]}"
PYTHON="$py311" VENV=.venv-oldest CONSTRAINTS=scripts/oldest.txt bash scripts/bootstrap.sh
JAX_COMPILATION_CACHE_DIR="$cache-oldest" .venv-oldest/bin/python -m pytest "${OLDEST_TESTS[@]}"

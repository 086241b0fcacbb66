#!/usr/bin/env bash
# Installs what is needed (scripts/bootstrap.sh), then runs the quick featurized
# Ball-in-Cup training run (a few minutes on a 2-core CPU). Extra arguments are passed on,
# e.g. `bash scripts/main.sh --config.logdir=runs/mine`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
exec .venv/bin/python experiments/ball_in_cup.py --preset quick "$@"

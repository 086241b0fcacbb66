#!/usr/bin/env bash
# The first contact: installs what is needed (scripts/bootstrap.sh), trains DALI-D on
# featurized Ball-in-Cup with gravity varied in training (`--preset first`: tiny model, the
# project's alignment recipe, 100k env steps; README.md gives the time), then evaluates it
# zero-shot on the contexts its setting scores (4 interpolation and 10 extrapolation
# gravities, 10 episodes each) and draws its learning curve.
#   LOGDIR=runs/mine bash scripts/main.sh [--config.FIELD=VALUE ...]
# Extra arguments go to the training run; running it again resumes an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
LOGDIR="${LOGDIR:-runs/first_contact}"
.venv/bin/python experiments/ball_in_cup.py --preset first --config.logdir="$LOGDIR" "$@"
.venv/bin/python -m dali_jax.evaluate --logdir "$LOGDIR" --contexts scored --episodes 10
.venv/bin/python -m dali_jax.curves "$LOGDIR" --out "$LOGDIR/curves"
echo "TensorBoard logs: $LOGDIR (events.out.tfevents.*)  learning curve: $LOGDIR/curves/curves.png"

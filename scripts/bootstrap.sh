#!/usr/bin/env bash
# Idempotent set-up: system libraries for headless EGL rendering, then a virtual environment
# (.venv) with dali_jax installed in editable mode plus the test extras. Re-running is cheap:
# pip is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=""
for lib in libEGL.so.1 libEGL_mesa.so.0 libGL.so.1; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || need_apt=1
done
if [ -n "$need_apt" ]; then
  echo "[bootstrap] installing EGL/Mesa system packages"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 >/dev/null
fi

# Python 3.11-3.13 are supported (pyproject.toml picks the JAX each can have). The default
# is the newest of 3.12 and 3.11 found (the command, or a pyenv install); 3.13 on request
# (PYTHON=python3.13 or a path): dm-control's labmaze has no wheel for it, so it is installed
# without labmaze (only dm-control's maze tasks need it). VENV= (default .venv) names the
# environment; CONSTRAINTS= a pip constraints file (scripts/oldest.txt: the oldest supported
# versions, for the CI subset on 3.11).
VENV="${VENV:-.venv}"
source scripts/find_python.sh
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
  "$PY" -c "import sys" >/dev/null 2>&1 || { echo "[bootstrap] PYTHON=$PY does not run" >&2; exit 1; }
else
  PY="$(find_python 3.12 || find_python 3.11 || echo python3)"
fi
want_ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$want_ver" in 3.11|3.12|3.13) ;; *) echo "[bootstrap] Python $want_ver: dali_jax needs 3.11, 3.12 or 3.13 (set PYTHON=)" >&2; exit 1 ;; esac
if [ -x "$VENV/bin/python" ]; then
  have_ver="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ -n "${PYTHON:-}" ] && [ "$have_ver" != "$want_ver" ]; then
    echo "[bootstrap] $VENV has Python $have_ver, PYTHON=$PY is $want_ver: remove $VENV first" >&2
    exit 1
  fi
else
  echo "[bootstrap] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install -q)
[ -n "${CONSTRAINTS:-}" ] && pip+=(-c "$CONSTRAINTS")
stamp="$VENV/.dali_jax_installed"
want="$(cat pyproject.toml ${CONSTRAINTS:-} | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing dali_jax and its dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2] >= (3, 13))')" = True ]; then
    # dm-control without labmaze (no 3.13 wheel; building it needs bazel).
    "${pip[@]}" "mujoco==3.17.0" absl-py dm-env dm-tree glfw lxml protobuf pyopengl pyparsing requests
    "${pip[@]}" --no-deps "dm-control==1.0.50"
  fi
  "${pip[@]}" -e ".[test]"
  echo "$want" > "$stamp"
fi

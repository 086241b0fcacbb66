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

# Python 3.11-3.13 are supported (pyproject.toml picks the JAX each can have); the default is
# 3.11, what CI runs. PYTHON=python3.12 (a command or a path) selects another one.
PY="${PYTHON:-python3.11}"
"$PY" -c "import sys" >/dev/null 2>&1 || { [ -n "${PYTHON:-}" ] && { echo "[bootstrap] PYTHON=$PY does not run" >&2; exit 1; }; PY=python3; }
want_ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$want_ver" in 3.11|3.12|3.13) ;; *) echo "[bootstrap] Python $want_ver: dali_jax needs 3.11, 3.12 or 3.13 (set PYTHON=)" >&2; exit 1 ;; esac
if [ -x .venv/bin/python ]; then
  have_ver="$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ -n "${PYTHON:-}" ] && [ "$have_ver" != "$want_ver" ]; then
    echo "[bootstrap] .venv has Python $have_ver, PYTHON=$PY is $want_ver: remove .venv first" >&2
    exit 1
  fi
else
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=".venv/.dali_jax_installed"
want="$(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing dali_jax and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi

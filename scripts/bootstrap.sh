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

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
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

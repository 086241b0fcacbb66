# Sourced by scripts/bootstrap.sh and scripts/test.sh.
# find_python 3.12 -> prints a command that runs that Python version (the pythonX.Y command,
# or a pyenv install of it), or fails.
find_python() {
  local v=$1 c
  for c in "python$v" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
    if "$c" -c "import sys; assert '%d.%d' % sys.version_info[:2] == '$v'" >/dev/null 2>&1; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

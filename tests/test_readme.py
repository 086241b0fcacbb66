"""README.md's code runs as written: its Python blocks are executed, and every command of its
bash blocks names a module or script whose --help works and lists the options used."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _commands():
    """(module or script argv, options used) of each `.venv/bin/python ...` line."""
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if not line.startswith(".venv/bin/python"):
                continue
            words = line.split()[1:]
            target = words[:2] if words[0] == "-m" else words[:1]
            opts = {w.split("=")[0] for w in words if w.startswith("--")} - {"--help"}
            out.append((tuple(target), opts))
    return out


def test_readme_python_blocks_run(tmp_path):
    blocks = _blocks("python")
    assert blocks
    for code in blocks:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("target,opts", _commands(), ids=lambda x: " ".join(x)
                         if isinstance(x, tuple) else "")
def test_readme_commands_take_their_options(target, opts):
    r = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    for opt in opts:
        if opt.startswith("--config.") or opt == "--preset":  # an experiment file's fields
            assert "--preset" in r.stdout
            field = opt[len("--config."):].split(".")[-1] if opt != "--preset" else "preset"
            assert re.search(rf"\b{re.escape(field)}\b", r.stdout), (target, opt)
        else:
            assert opt in r.stdout, (target, opt)


def test_readme_commands_cover_the_clis():
    targets = {t for t, _ in _commands()}
    assert ("-m", "dali_jax.study") in targets and ("-m", "dali_jax.evaluate") in targets
    assert ("experiments/ball_in_cup.py",) in targets

"""The library core imports without the simulators and the host-side libraries.

Users on accelerator images often have only jax/flax/optax/chex/ml-collections/numpy: the
model code, the config and benchmarks/train_step.py must work there. The check runs in a
subprocess whose import system refuses the optional modules."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = ("mujoco", "dm_control", "carl", "tensorboardX", "matplotlib", "sklearn", "scipy",
           "imageio", "submitit", "orbax", "tqdm", "rliable", "pandas")

SCRIPT = f"""
import importlib.abc, runpy, sys
BLOCKED = {BLOCKED!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Refuse())
import jax, numpy as np
from dali_jax import config as config_lib
from dali_jax.agent import Agent, Spec, count_params
import dali_jax.models.rssm, dali_jax.models.context_encoder, dali_jax.models.behavior
import dali_jax.models.conv, dali_jax.methods, dali_jax.presets
c = config_lib.get_config()
c.method = "dali_d"
spec = Spec(obs={{"obs": ((8,), np.float32), "context": ((2,), np.float32)}}, action_dim=2)
n = count_params(jax.eval_shape(Agent(c, spec).init, jax.random.PRNGKey(0)).params)
sys.argv = ["train_step.py", "--help"]
try:
    runpy.run_path("benchmarks/train_step.py", run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
print("PARAMS", n)
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_core_imports_without_simulators_and_host_libraries():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(l.split(" ", 1) for l in out.stdout.splitlines() if l[:6] in ("PARAMS", "LOADED"))
    assert int(lines["PARAMS"]) > 1_000_000  # a real DALI-D agent was built
    assert lines["LOADED"] == "[]"

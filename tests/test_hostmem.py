"""dali_jax.hostmem: freed memory is kept by the process, so reusing it costs no page faults."""
import os
import subprocess
import sys
import textwrap

import pytest

from dali_jax import hostmem

# In a fresh process: allocate and fill 24 MiB, free it, allocate and fill 24 MiB again, and
# print the minor page faults of the second pass (glibc's default mmaps the first block and
# unmaps it on free, then serves the second from newly grown heap: fresh pages again).
_PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from dali_jax import hostmem
    print(hostmem.tune_malloc())
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    n = 24 << 20
    def touch():
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    libc.free(touch())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
""")


def _faults(tune: bool):
    env = dict(os.environ, DALI_JAX_TUNE_MALLOC="1" if tune else "0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_reuses_freed_memory():
    applied, tuned = _faults(True)
    off, untuned = _faults(False)
    assert applied and not off
    pages = (24 << 20) // 4096
    assert untuned > pages // 2  # the default allocator faults the block in again
    assert tuned < pages // 20  # tuned: the freed block comes back without faults


def test_tune_malloc_is_idempotent():
    first = hostmem.tune_malloc()
    assert hostmem.tune_malloc() is first

"""Data parallelism over local devices with jax.jit + NamedSharding.

Parameters and optimiser state are replicated; the batch is sharded along its leading
(batch) axis over a 1-D mesh named "data". XLA inserts the gradient all-reduce, so the
sharded update computes the same function as the single-device one.
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def make_mesh(num_devices: int = 0):
    """1-D mesh over the first `num_devices` local devices (0: all of them)."""
    devices = jax.local_devices()
    n = len(devices) if num_devices in (0, None) else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"config.run.devices must be in [0, {len(devices)}]; got {num_devices}")
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def shardings(mesh):
    """(replicated, batch-sharded) NamedShardings."""
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def sharded_train_step(agent, mesh, batch_size: int):
    """jit of agent.update with state replicated, batch sharded, state donated."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"config.train.batch_size ({batch_size}) must be divisible by the "
                         f"number of devices ({n})")
    rep, data = shardings(mesh)
    return jax.jit(agent.update, in_shardings=(rep, data, rep),
                   out_shardings=(rep, rep), donate_argnums=(0,),
                   compiler_options=agent.compiler_options)


def replicate(tree, mesh):
    rep, _ = shardings(mesh)
    return jax.device_put(tree, rep)

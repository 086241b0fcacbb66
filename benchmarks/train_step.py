"""Cost of one agent update (`Agent.train_step`) per size preset, observation kind and method.

    python benchmarks/train_step.py [--sizes small,medium] [--obs features,pixels]
        [--methods dreamer_dr,dali_d] [--repeats 5] [--batch 16 --length 64 --horizon 15]
        [--release-ref SECONDS] [--quick] [--json FILE]

Problems: Walker's shapes, featurized (obs 24, action 6, context 2) or 64x64x3 pixels
(action 6, context 2), the shapes of the release's parameter counts; synthetic batches of
B x T transitions.

A method may carry config overrides after `@` (`;`-separated), which makes an A/B of one
option, e.g. `--methods "dreamer_dr@model.conv_impl=native,dreamer_dr@model.conv_impl=matmul"`.

Per configuration:
- lower / compile: `agent.train_step.lower(...)` and `.compile()` seconds (ahead of time,
  on a separate jit wrapper so the figure below starts cold too);
- first call: wall time of the first `agent.train_step(...)` call (trace + compile + run);
- s/update: median over `--repeats` timed calls after one warm-up call, each ended by
  `block_until_ready` on the returned metrics and state;
- transitions/s: B * T / median (replayed transitions per second);
- GFLOP: `dali_jax.flops.count_flops` on the un-jitted `agent.update` with abstract
  inputs (every scan step counted; dot_general and convolutions, forward and backward);
  `xla GFLOP` is XLA's cost analysis of the compiled update for comparison (it counts each
  loop body once, so it under-reports the scanned RSSM);
- GFLOP/s: GFLOP / median; params: trainable parameters (model, actor, critic and, for
  DALI, g_phi and its heads; slow critic excluded);
- x base: update time relative to the first method of `--methods` (dreamer_dr by default)
  at the same size and observation kind: the median over `--rounds` interleaved passes (one
  update of every method per pass) of the per-pass ratio, robust to the speed drift of a
  shared machine;
- `--release-ref SECONDS`: a stored figure of the public release's update for the same
  problem (e.g. 63.6 s for small pixels on the reference CPU); each row then also prints
  its ratio to it;
- plain matmul: GFLOP/s of a float32 1024 x 1536 x 1024 product measured before and after
  (and after each configuration, in the JSON), to tell how fast the machine was.

The persistent compilation cache is disabled so compile times are cold (`--cache` keeps
whatever the environment configures). The compute dtype is the config's (default "auto":
float32 on CPU, bfloat16 on GPU/TPU) unless `--dtype` is given.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dali_jax import config as config_lib
from dali_jax import hostmem
from dali_jax import overrides
from dali_jax.agent import Agent, Spec, compute_dtype, count_params
from dali_jax.flops import count_flops

PROBLEMS = {
    # obs kind -> (task, observation spec, action dim); Walker's shapes, as the release's
    # parameter counts (18,708,003 features, 17,926,030 pixels) and timings
    "features": ("walker", {"obs": ((24,), np.float32), "context": ((2,), np.float32)}, 6),
    "pixels": ("walker", {"image": ((64, 64, 3), np.uint8),
                          "context": ((2,), np.float32)}, 6),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small", help="comma-separated size presets")
    p.add_argument("--obs", default="features,pixels", help="features, pixels or both")
    p.add_argument("--methods", default="dreamer_dr,dali_d",
                   help="comma-separated methods, each optionally METHOD@key=value;key=value")
    p.add_argument("--release-ref", type=float, default=None,
                   help="the release's s/update for the same problem, to print the ratio")
    p.add_argument("--repeats", type=int, default=5, help="timed updates after warm-up")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved passes (one update of each method per pass) for the "
                        "x dreamer_dr ratios; 0: ratio of the separate medians")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="compute dtype (default: the config's)")
    p.add_argument("--window", type=int, default=None,
                   help="context window K (default: the config's, 64); DALI methods train "
                        "on K steps of history + the chunk")
    p.add_argument("--no-quirk", action="store_true",
                   help="encoder/decoder MLPs at the preset's size instead of 5 x 1024")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: nano size, batch 4 x 16, 2 repeats")
    p.add_argument("--cache", action="store_true",
                   help="keep the persistent compilation cache if one is configured")
    p.add_argument("--json", default=None, help="append one JSON line per configuration")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc malloc at its defaults (dali_jax.hostmem)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.length, args.repeats = "nano", 4, 16, 2
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
    args.sizes, args.obs, args.methods = split(args.sizes), split(args.obs), split(args.methods)
    for o in args.obs:
        if o not in PROBLEMS:
            p.error(f"--obs must be from {', '.join(PROBLEMS)}; got {o!r}")
    for s in args.sizes:
        if s not in config_lib.SIZES:
            p.error(f"--sizes must be from {', '.join(config_lib.SIZES)}; got {s!r}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def make_config(args, size, obs, variant):
    method, _ = overrides.split_variant(variant)
    c = config_lib.get_config()
    c.task = PROBLEMS[obs][0]
    c.obs = obs
    c.method = method
    c.model.size = size
    if args.no_quirk:
        c.model.encdec_release_quirk = False
    if args.window:
        c.context.window = args.window
    if args.dtype:
        c.compute_dtype = args.dtype
    c.train.batch_size, c.train.batch_length = args.batch, args.length
    c.train.imag_horizon = args.horizon
    overrides.apply_variant(c, variant, "--methods")
    config_lib.validate(c)
    return c


def make_batch(spec: Spec, B: int, T: int, seed: int = 0) -> dict:
    """Synthetic replay chunk (B, T, ...) with the agent's batch keys."""
    rng = np.random.default_rng(seed)
    batch = {}
    for k, (shape, dtype) in spec.obs.items():
        if np.dtype(dtype) == np.uint8:
            batch[k] = rng.integers(0, 256, (B, T) + tuple(shape), dtype=np.uint8)
        else:
            batch[k] = rng.normal(size=(B, T) + tuple(shape)).astype(dtype)
    batch["action"] = rng.uniform(-1, 1, (B, T, spec.action_dim)).astype(np.float32)
    batch["reward"] = rng.uniform(0, 1, (B, T)).astype(np.float32)
    batch["is_first"] = np.zeros((B, T), bool)
    batch["is_first"][:, 0] = True
    batch["is_last"] = np.zeros((B, T), bool)
    batch["is_terminal"] = np.zeros((B, T), bool)
    return batch


def abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def xla_flops(compiled):
    """XLA's own FLOP estimate of a compiled computation (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def block(tree):
    return jax.block_until_ready(tree)


def matmul_probe(n: int = 1024, k: int = 1536, repeats: int = 15) -> float:
    """GFLOP/s of a plain float32 (n x k) @ (k x n) product, median of `repeats`: the
    machine's speed at the time (shared virtual machines vary by 30% or more within an
    hour), printed with the figures so that runs can be compared."""
    a = jnp.ones((n, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    block(f(a, b))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        block(f(a, b))
        times.append(time.perf_counter() - t)
    return 2 * n * n * k / statistics.median(times) / 1e9


def bench_one(args, size, obs, method) -> dict:
    config = make_config(args, size, obs, method)
    _, obs_spec, act_dim = PROBLEMS[obs]
    spec = Spec(obs=obs_spec, action_dim=act_dim)
    agent = Agent(config, spec)
    key = jax.random.PRNGKey(0)
    state = block(agent.init(key))
    params = count_params(state.params)
    batch = block(jax.device_put(make_batch(spec, args.batch, agent.sequence_length)))

    # FLOPs: trace only, abstract inputs (no memory for the arrays).
    t = time.perf_counter()
    flops = count_flops(agent.update, abstract(state), abstract(batch),
                        jax.ShapeDtypeStruct(key.shape, key.dtype))
    count_s = time.perf_counter() - t

    # Ahead-of-time lowering and compilation on a separate wrapper (its own caches).
    aot = jax.jit(functools.partial(agent.update), donate_argnums=(0,))
    t = time.perf_counter()
    lowered = aot.lower(state, batch, key)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    xla = xla_flops(compiled)
    del compiled, lowered, aot

    # First call of the agent's own jitted update: trace + compile + one update.
    t = time.perf_counter()
    state, metrics = agent.train_step(state, batch, key)
    block((state, metrics))
    first_s = time.perf_counter() - t

    # Warm-up, then timed updates.
    state, metrics = agent.train_step(state, batch, jax.random.fold_in(key, 1))
    block((state, metrics))
    times = []
    for i in range(args.repeats):
        k = jax.random.fold_in(key, 2 + i)
        t = time.perf_counter()
        state, metrics = agent.train_step(state, batch, k)
        block((metrics, state))
        times.append(time.perf_counter() - t)
    finite = bool(all(np.isfinite(np.asarray(v)).all() for v in metrics.values()))
    median = statistics.median(times)
    dev = jax.devices()[0]
    carry = {"state": state, "i": 100}

    def one_update() -> float:
        """Time one more update (for the interleaved ratio passes)."""
        carry["i"] += 1
        t = time.perf_counter()
        carry["state"], m = agent.train_step(carry["state"], batch,
                                             jax.random.fold_in(key, carry["i"]))
        block((m, carry["state"]))
        return time.perf_counter() - t

    return one_update, dict(
        size=size, obs=obs, method=method, params=params,
        batch=args.batch, length=args.length, horizon=args.horizon,
        dtype=jnp.dtype(compute_dtype(config.compute_dtype)).name,
        encdec_quirk=bool(config.model.encdec_release_quirk),
        lower_s=lower_s, compile_s=compile_s, first_call_s=first_s,
        median_s=median, min_s=min(times), times_s=times,
        transitions_per_s=args.batch * args.length / median,
        flops=int(flops), gflop=flops / 1e9, gflops_per_s=flops / 1e9 / median,
        xla_gflop=None if xla is None else xla / 1e9, flop_count_s=count_s,
        metrics_finite=finite,
        device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
        cpus=os.cpu_count(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows) -> str:
    head = ("| size | obs | method | params | lower s | compile s | first call s | s/update "
            "| transitions/s | GFLOP | xla GFLOP | GFLOP/s | x base |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['obs']} | {r['method']} | {r['params']:,} "
            f"| {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['first_call_s']:.1f} "
            f"| {r['median_s']:.3f} | {r['transitions_per_s']:,.0f} | {r['gflop']:.1f} "
            f"| {fmt(r['xla_gflop'], '.1f')} | {r['gflops_per_s']:.1f} "
            f"| {fmt(r['ratio_to_base'], '.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    malloc = False if args.no_tune_malloc else hostmem.tune_malloc()
    if not args.cache:
        jax.config.update("jax_enable_compilation_cache", False)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} (platform {dev.platform}, {jax.device_count()} device(s)); "
          f"jax {jax.__version__}; python {platform.python_version()}; "
          f"{os.cpu_count()} CPU cores; malloc tuned: {malloc}")
    print(f"batch {args.batch} x {args.length}, horizon {args.horizon}, "
          f"repeats {args.repeats}, dtype {args.dtype or 'config default (auto)'}, "
          f"sizes {','.join(args.sizes)}, obs {','.join(args.obs)}, "
          f"methods {','.join(args.methods)}", flush=True)
    probe0 = matmul_probe()
    print(f"plain matmul (1024 x 1536 x 1024, float32): {probe0:.0f} GFLOP/s", flush=True)
    rows = []
    for size in args.sizes:
        for obs in args.obs:
            group, runners = [], []
            for method in args.methods:
                run, row = bench_one(args, size, obs, method)
                row["matmul_gflops_per_s"] = matmul_probe()
                group.append(row)
                runners.append(run)
                print(f"  {size} {obs} {method}: {row['median_s']:.3f} s/update, first call "
                      f"{row['first_call_s']:.1f} s, {row['gflop']:.1f} GFLOP, "
                      f"{row['gflops_per_s']:.1f} GFLOP/s", flush=True)
            base_i = 0
            if len(group) > 1 and args.rounds > 0:
                # Interleaved passes (dr, m1, m2, dr, m1, ...): each ratio is a median of
                # per-pass ratios, so a drift in the machine's speed cancels.
                per_round = [[run() for run in runners] for _ in range(args.rounds)]
                for i, r in enumerate(group):
                    r["interleaved_s"] = [t[i] for t in per_round]
                    r["ratio_to_base"] = statistics.median(
                        t[i] / t[base_i] for t in per_round)
            else:
                for r in group:
                    r["ratio_to_base"] = r["median_s"] / group[base_i]["median_s"]
            for r in group:
                if args.release_ref:
                    r["release_ref_s"] = args.release_ref
                    r["ratio_to_release"] = r["median_s"] / args.release_ref
                    print(f"  {size} {obs} {r['method']}: {r['median_s']:.2f} s/update vs the "
                          f"release's {args.release_ref:.2f} s: x{r['ratio_to_release']:.2f}",
                          flush=True)
            del runners
            jax.clear_caches()
            rows.extend(group)
            if args.json:
                with open(args.json, "a") as f:
                    for r in group:
                        f.write(json.dumps(r) + "\n")
    probe1 = matmul_probe()
    print()
    print(f"device: {dev.device_kind} ({dev.platform}); plain matmul {probe0:.0f} GFLOP/s "
          f"before, {probe1:.0f} after")
    print(table(rows))
    if not all(r["metrics_finite"] for r in rows):
        print("warning: some metrics were not finite", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()

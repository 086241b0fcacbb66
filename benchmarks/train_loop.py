"""End-to-end training throughput: env steps per second and where the wall time goes.

    python benchmarks/train_loop.py --task ball_in_cup --preset quick --steps 4000
    python benchmarks/train_loop.py --preset paper --obs pixels --steps 2000 --method dali_d
    python benchmarks/train_loop.py --preset cpu --method dali_d --config.context.hidden=32

Runs the real trainer (prefill excluded from the timed window when --skip-prefill) on a
fresh temporary logdir and prints env steps/s, updates/s and the fraction of loop time in
acting (policy incl. waiting for the device), env stepping, update dispatch (incl. replay
waits) and logging, plus the prefetch wait fraction.
"""
import argparse
import json
import os
import threading
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MUJOCO_GL", "egl")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="ball_in_cup", choices=["ball_in_cup", "walker"])
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--obs", default="features")
    ap.add_argument("--method", default=None)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--train-ratio", type=float, default=None)
    ap.add_argument("--prefill", type=int, default=None, help="override run.prefill")
    ap.add_argument("--warmup", type=int, default=0,
                    help="first run prefill + WARMUP env steps and stop (compiles, fills the "
                         "persistent compilation cache), then time the resumed run to --steps")
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="stop the timed run after this many seconds (compilation included: "
                         "use --warmup to compile first); 0: run to --steps")
    ap.add_argument("--json", default=None, help="append the figures as one JSON line")
    args, extra = ap.parse_known_args()
    from dali_jax import hostmem
    hostmem.tune_malloc()
    import jax
    from dali_jax.training.train import Trainer
    if args.task == "ball_in_cup":
        from experiments.ball_in_cup import get_config
    else:
        from experiments.walker_walk import get_config
    cfg = get_config(args.preset)
    cfg.obs = args.obs
    if args.method:
        cfg.method = args.method
    if args.train_ratio:
        cfg.run.train_ratio = args.train_ratio
    if args.prefill is not None:
        cfg.run.prefill = args.prefill
    cfg.run.steps = args.steps
    from dali_jax import launch, overrides
    overrides.apply_overrides(cfg, extra)  # --config.FIELD=VALUE, as in experiment files
    cfg.run.eval_every = 0
    cfg.run.eval_episodes = 1  # the final evaluation is outside the timed loop; keep it short
    cfg.run.log_every_s = 1e9
    cfg.run.save_every_s = 1e9
    tmp = tempfile.mkdtemp(prefix="dali_bench_")
    cfg.logdir = tmp
    try:
        start_steps = start_updates = 0
        if args.warmup:
            launch.enable_compilation_cache()
            warm = Trainer(cfg, stop_after_env_steps=cfg.run.prefill + args.warmup).run()
            start_steps, start_updates = warm["env_steps"], warm["updates"]
        trainer = Trainer(cfg)
        timer = None
        if args.max_seconds:  # the loop stops at its next step, as at stop_after_env_steps
            timer = threading.Timer(args.max_seconds, setattr, (trainer, "stop_after", 0))
            timer.start()
        t0 = time.time()
        out = trainer.run()
        if timer is not None:
            timer.cancel()
        wall = time.time() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timers = out["timers"]
    loop = sum(v for k, v in timers.items() if k != "eval")
    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}")
    print(f"task={args.task} preset={args.preset} obs={cfg.obs} method={cfg.method} "
          f"size={cfg.model.size} batch={cfg.train.batch_size}x{cfg.train.batch_length} "
          f"train_ratio={cfg.run.train_ratio} envs={cfg.run.num_envs}"
          + (f" {' '.join(extra)}" if extra else ""))
    steps, updates = out["env_steps"] - start_steps, out["updates"] - start_updates
    print(f"env steps {steps} (from {start_steps}), updates {updates}, wall "
          f"{wall:.1f}s (incl. compile and final eval), loop {loop:.1f}s")
    print(f"env steps/s (loop): {steps / loop:.1f}; updates/s: {updates / loop:.2f}")
    for k, v in timers.items():
        if k != "eval":
            print(f"  {k:12s} {v:8.1f}s  {100 * v / loop:5.1f}%")
    if args.json:
        rec = dict(bench="train_loop", device=f"{dev.platform} {getattr(dev, 'device_kind', '')}",
                   task=args.task, preset=args.preset, obs=cfg.obs, method=cfg.method,
                   size=cfg.model.size, overrides=extra, env_steps=steps, updates=updates,
                   loop_s=loop,
                   wall_s=wall, env_steps_per_s=steps / loop, updates_per_s=updates / loop,
                   stopped=bool(out.get("stopped")),
                   timers={k: v for k, v in timers.items() if k != "eval"})
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

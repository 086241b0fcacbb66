#!/usr/bin/env bash
# One prepared script for a machine with a GPU (or TPU) and no network.
#
#   bash benchmarks/gpu.sh [--cpu] [WHEELS_DIR]
#
# WHEELS_DIR: wheels of what the image lacks (benchmarks/gpu_wheels.txt says which and how
# to download them); installed with --no-index into a private folder on PYTHONPATH.
# Steps: the accelerator-path tests, then `train_step.py` (small; features and pixels;
# dreamer_dr and dali_d; bfloat16 and float32), then a two-minute paper-preset training
# loop when dm-control is importable. Figures go to $OUT/gpu.jsonl (OUT defaults to
# runs/gpu), one JSON line per measurement, each with the device's name; the log beside it.
# --cpu: the same script on the CPU at nano sizes, features only (a dry run: a few minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0; wheels=""
for a in "$@"; do
  case "$a" in
    --cpu) cpu=1 ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) wheels="$a" ;;
  esac
done
OUT="${OUT:-runs/gpu}"; mkdir -p "$OUT"
json="$OUT/gpu.jsonl"; log="$OUT/gpu.log"; : > "$json"; : > "$log"
PY="${PYTHON:-python3}"
say() { echo "[gpu.sh $(date +%T)] $*" | tee -a "$log"; }

if [ -n "$wheels" ]; then
  say "installing wheels from $wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dali_site "$wheels"/*.whl >> "$log" 2>&1 || { say "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/dali_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
if [ "$cpu" = 1 ]; then
  export JAX_PLATFORMS=cpu
  sizes="nano"; obs="features"; ts_extra="--quick"; loop_s=30; loop_preset="smoke"
  tests=(tests/agent/test_accelerator_path.py -k "dali_d and features")
else
  export JAX_PLATFORMS=""  # empty, not unset: tests/conftest.py would pin the CPU
  sizes="small"; obs="features,pixels"; ts_extra="--repeats 5 --rounds 0"; loop_s=120; loop_preset="paper"
  tests=(tests/agent/test_accelerator_path.py tests/models/test_rssm.py tests/models/test_nets.py)
fi
"$PY" - <<'PY' | tee -a "$log" >> "$json"
import json, platform, jax
d = jax.devices()[0]
print(json.dumps(dict(bench="device", platform=d.platform, device=d.device_kind,
                      devices=jax.device_count(), jax=jax.__version__,
                      python=platform.python_version())))
PY

say "tests: the accelerator path, RSSM, networks (on $( [ $cpu = 1 ] && echo CPU || echo the device ))"
"$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" >> "$log" 2>&1
rc=$?; tail -1 "$log"
echo "{\"bench\": \"tests\", \"exit_code\": $rc}" >> "$json"

for dtype in bfloat16 float32; do
  say "train_step.py sizes=$sizes obs=$obs methods=dreamer_dr,dali_d dtype=$dtype"
  "$PY" benchmarks/train_step.py --sizes "$sizes" --obs "$obs" --methods dreamer_dr,dali_d \
    --dtype "$dtype" $ts_extra --json "$json" >> "$log" 2>&1 || say "train_step.py failed ($dtype)"
done

if "$PY" -c "import dm_control" 2>/dev/null; then
  say "train_loop.py preset=$loop_preset dali_d, ${loop_s} s"
  "$PY" benchmarks/train_loop.py --preset "$loop_preset" --method dali_d --steps 1000000 \
    --warmup 200 --max-seconds "$loop_s" --json "$json" >> "$log" 2>&1 || say "train_loop.py failed"
else
  say "dm_control not importable: training loop skipped (give its wheels to run it)"
fi
say "done: $json"
"$PY" - "$json" <<'PY' | tee -a "$log"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("bench") == "train_step" or "median_s" in r:
        print({k: r.get(k) for k in ("size", "obs", "method", "dtype", "median_s",
                                       "first_call_s", "device") if k in r})
    else:
        print({k: v for k, v in r.items() if k != "timers"})
PY

#!/usr/bin/env bash
# The GPU path, measured in one short run: MoE dispatch paths and the base config's train step.
#
#   bash tools/gpu_check.sh --download-wheels     # here, with pip's registry: wheels -> .whl/
#   bash tools/gpu_check.sh [OUT_DIR]             # on the GPU machine (carry .whl), or here to rehearse
#
# On a machine with CUDA JAX (python3 there holds it) it
#   0. installs what the image lacks from the carried wheels in .whl/ (into /tmp/site, never
#      over the image's own jax), and records the device, the JAX version and the packages;
#   1. times one MoE layer of $CONFIG's deepest stage, forward + backward in bfloat16, for every
#      dispatch path (tokamax's grouped matmul included where it imports; otherwise listed as
#      skipped with the reason) under the configured router and expert choice (tools.bench moe);
#   2. runs $STEPS train steps of $CONFIG in bfloat16 on synthetic 192 px crops for the two
#      fastest paths of step 1 (tools.bench step, scanned blocks): median step time, samples/s,
#      MFU against the device's bf16 peak (ringmoe/flops.py) and peak device memory;
#   3. profiles $PROFILE_STEPS more steps of each and ranks the top 10 operations (jax.profiler,
#      ringmoe/training/profile.py), written as text;
#   4. writes OUT_DIR/gpu_check.json (all of it, and the `dispatch.MEASURED` row this backend
#      should get), OUT_DIR/top_ops_<path>.txt and OUT_DIR/gpu_check.log; the JSON is also the
#      last line of stdout.
# Every stage has a timeout; a stage that fails or times out is recorded as such and the run
# goes on. The defaults' timeouts add up to 580 s, inside one 10-minute device command
# (run it with timeout_s=600); to rehearse on a 2-core CPU:
#   STEPS=2 BATCH=8 PROFILE_STEPS=1 RECORDS=16 MOE_BATCH=4 MOE_TIMEOUT=600 STEP_TIMEOUT=900 \
#     bash tools/gpu_check.sh /tmp/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks (its package list: the device tool's KINDS.md), pinned as in
# requirements.txt or as pip resolved them there, and the project's own flax, optax and
# orbax-checkpoint (pure Python), so that the library runs the versions CI tests; jax and
# jaxlib (CUDA builds, too big to carry) are the image's. Downloaded --no-deps: every need
# is named.
WHEELS=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 portpicker==1.6.0
        tokamax==0.0.12 einshape==1.0 qwix==0.1.8 typeguard==2.13.3 immutabledict==4.3.1
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8)
DEVICE_PYTHON_VERSION=${DEVICE_PYTHON_VERSION:-3.12}

if [[ "${1:-}" == "--download-wheels" ]]; then
  mkdir -p .whl
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  exec "${PY:-python3}" -m pip download --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON_VERSION" \
    --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PY:-python3}
CONFIG=${CONFIG:-configs/base.py}
STEPS=${STEPS:-30}                # timed train steps per path
BATCH=${BATCH:-64}                # global images per step (the base config's)
MOE_BATCH=${MOE_BATCH:-16}        # images in the MoE layer benchmark (one modality's share of BATCH)
PROFILE_STEPS=${PROFILE_STEPS:-3}
RECORDS=${RECORDS:-32}            # synthetic paired records, 256 px (random-resized to 192 px crops)
# Stage timeouts: together under the device tool's 10 minutes per command (150 + 90 + 2 x 170 s).
MOE_TIMEOUT=${MOE_TIMEOUT:-150}
DATA_TIMEOUT=${DATA_TIMEOUT:-90}
STEP_TIMEOUT=${STEP_TIMEOUT:-170}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT_DIR" "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
DTYPE=(--config.model.dtype=bfloat16)

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# Runs a stage with a timeout, its output into the log; its last stdout line (the JSON) into $2.
stage() {
  local name=$1 json=$2 seconds=$3; shift 3
  say "$name: $*"
  local start=$SECONDS
  timeout --kill-after=20 "$seconds" "$@" > "$WORK/$name.out" 2>> "$LOG"
  local rc=$?
  cat "$WORK/$name.out" >> "$LOG"
  if [[ $rc -eq 0 ]]; then
    tail -n 1 "$WORK/$name.out" > "$json"
  else
    local why="exit status $rc"; [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${seconds} s"
    printf '{"error": "%s", "command": "%s"}\n' "$why" "$*" > "$json"
  fi
  say "$name: done in $((SECONDS - start)) s ($( [[ $rc -eq 0 ]] && echo ok || echo "failed: rc $rc"))"
}

# 0. The environment.
if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || { say "wheel install failed (see $LOG)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - > "$WORK/env.json" 2>> "$LOG" <<'EOF'
import importlib.metadata as md, json, platform
import jax
from ringmoe.model import dispatch
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tokamax", "numpy")
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
print(json.dumps({"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                  "devices": jax.device_count(), "python": platform.python_version(), "versions": versions,
                  "unavailable_paths": {p: w for p in dispatch.PATHS if (w := dispatch.unavailable(p))}}))
EOF
[[ -s "$WORK/env.json" ]] || { say "JAX or the project does not import (see $LOG)"; exit 1; }
say "environment: $(cat "$WORK/env.json")"

# 1. Every dispatch path on the deepest MoE layer, bfloat16.
stage moe "$WORK/moe.json" "$MOE_TIMEOUT" \
  "$PY" -m tools.bench moe --config "$CONFIG" "${DTYPE[@]}" --batch "$MOE_BATCH"
read -r -a BEST < <("$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
ratios = {p: v['ratio'] for p, v in r.get('paths', {}).items()}
print(' '.join(sorted(ratios, key=ratios.get)[:2]) or 'sort ragged')" "$WORK/moe.json")
say "train steps for the two fastest paths: ${BEST[*]}"

# 2-3. Synthetic data, then the train step for each path, timed and profiled.
stage data "$WORK/data.json" "$DATA_TIMEOUT" \
  "$PY" -m tools.make_synthetic --out "$WORK/data" --examples "$RECORDS" --image-size 256 --seed 0
for path in "${BEST[@]}"; do
  stage "step_$path" "$WORK/step_$path.json" "$STEP_TIMEOUT" \
    "$PY" -m tools.bench step --data "$WORK/data" --config "$CONFIG" "${DTYPE[@]}" \
      --config.model.moe.dispatch="$path" --config.batch_size="$BATCH" --layouts scanned --steps "$STEPS" \
      --profile_dir "$WORK/profile_$path" --profile_steps "$PROFILE_STEPS"
  cp "$WORK/profile_$path/top_ops.txt" "$OUT_DIR/top_ops_$path.txt" 2>/dev/null || true
done

# 4. One JSON: every stage's, a table of the train steps, and the dispatch.MEASURED row.
"$PY" - "$WORK" "$OUT_DIR/gpu_check.json" "${BEST[@]}" <<'EOF' | tee -a "$LOG"
import json, sys
work, out, best = sys.argv[1], sys.argv[2], sys.argv[3:]
load = lambda name: json.load(open(f"{work}/{name}.json"))
env, moe = load("env"), load("moe")
result = {"environment": env, "moe": moe, "steps": {}}
for path in best:
    step = load(f"step_{path}")
    result["steps"][path] = step
    if "layouts" in step:
        r = step["layouts"]["scanned"]
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "n/a" if r["peak_bytes_in_use"] is None else f"{r['peak_bytes_in_use'] / 2**30:.1f} GiB"
        print(f"{path:>8}: step {r['step_s'] * 1e3:8.1f} ms  {r['samples_per_s']:8.1f} samples/s  MFU {mfu}"
              f"  peak memory {mem}  first call {r['train_first_s']:.1f} s")
    else:
        print(f"{path:>8}: {step.get('error')}")
if "paths" in moe:
    ratios = {p: round(v["ratio"], 3) for p, v in moe["paths"].items()}
    source = (f"{moe.get('command')} (bfloat16, batch {moe['layer']['batch']}, {moe['layer']['router']}); "
              f"{env['device_kind']}, jax {env['versions']['jax']}")
    result["measured_row"] = {env["backend"]: {"ratios": ratios, "source": source}}
    print(f"dispatch.MEASURED row: {env['backend']!r}: Measurement(ratios={ratios}, source={source!r})")
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result))
EOF

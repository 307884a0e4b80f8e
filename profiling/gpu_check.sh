#!/usr/bin/env bash
# The GPU record in one call (an H100/H200, a BUDGET of seconds), steps in priority order:
#   env           GPU, driver, torch, triton
#   wheels        install carried wheels from .whl/ (diffusers, torchao, liger-kernel; fetch them first
#                 with ../shared/tools/device-wheels.sh and name .whl in the device call's carry)
#   shim          make `spatialcore` importable without installing it (one import root of symlinks)
#   kernel_tests  every kernel against its reference on the GPU: tests/test_kernels_cuda.py and the
#                 kernel test files of `make test`, compiled (no Triton interpreter where CUDA exists)
#   kernel_bench  kernel microbenchmarks (CUDA events over CUDA-graph replays) + the target table
#   logprob       stored sampling log-probs vs the training recomputation in bf16 (micro-batches 1, 3, G)
#   score         `spatialcore bench score`: Qwen2.5-VL-7B-shaped SpatialScore vs the stock path
#   grpo_tiny     `spatialcore bench grpo` at tiny shapes on the GPU (seconds: the project's code path on CUDA)
#   grpo          `spatialcore bench grpo`: the trainer's own step on the reference config (FLUX.1-dev +
#                 Qwen2.5-VL-7B shapes, random weights) as rank 0 of 8 sees it
#   native        build the native extension spatialcore._C (CMake + nvcc, sm_90a) and test/time it
#   sample        `spatialcore bench sample`: FLUX.1-dev sampling eager vs compiled / float8 (rows are
#                 written as they finish, so the budget keeps what ran)
#   train_reward  the reference configs as a user launches them, with random weights of their shapes
#   train_grpo    (random:qwen2.5-vl-7b, random:flux.1-dev): a few steps with evaluation, stopped after the
#   train_sft     first checkpoint and resumed, then the export; per-phase peak memory and seconds per step
#                 (not in the default STEPS: STEPS="env wheels shim train_reward train_grpo train_sft")
# Each step gets its cap or what is left of the budget, whichever is less; the caps add up to at most
# BUDGET (checked). Everything is written to $RES; at the end $OUT receives summary.md (every table)
# and gpu_check.tgz (all logs, JSON and Markdown), two files, within the device tool's file limits.
#
#   bash profiling/gpu_check.sh                          the GPU run, full shapes
#   REHEARSAL=1 bash profiling/gpu_check.sh              the same commands on a CPU with tiny shapes
#                                                        (caps and budget x SCALE, 4 by default: CPUs are slow)
#   STEPS="env shim logprob" bash profiling/gpu_check.sh only these steps
#   CAPS="kernel_tests=120 grpo=90"                      other caps for some steps (the wanted steps' caps
#                                                        must still add up to at most BUDGET)
#   BLOCKING_STEPS="grpo"                                run those bench steps with CUDA_LAUNCH_BLOCKING=1
#   PLAN_ONLY=1                                          print the plan (steps, caps, budget) and stop:
#                                                        check a STEPS/CAPS choice before spending device time
#
# The project is not installed: `shim` links spatialcore/, kernels/, trainers/ and profiling/ into one
# import root and PYTHONSAFEPATH=1 keeps the checkout (the current directory) off sys.path, where its
# own spatialcore/ folder, which has no kernels/ inside, would hide the shim.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check}
RES=${RES:-/tmp/gpu_check_results}
SHIM=${SHIM:-/tmp/spatialcore-shim-$$}
REHEARSAL=${REHEARSAL:-0}
STEPS=${STEPS:-"env wheels shim kernel_tests kernel_bench logprob score grpo native sample"}
BUDGET=${BUDGET:-450}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 SPATIALCORE_PROGRESS=0
if [ "$REHEARSAL" = 1 ]; then
  SHAPE=tiny; DEVICE=(--device cpu); export TRITON_INTERPRET=1; SCALE=${SCALE:-4}
  KERNEL_SELECT=(-k "formula or multi_block")  # the interpreter is slow: the cheapest comparisons
  BENCH_SELECT="not synth and not collate and not compiled"  # CPU compiles take minutes
else
  SHAPE=full; DEVICE=(); export TRITON_INTERPRET=0; SCALE=${SCALE:-1}
  KERNEL_SELECT=()
  BENCH_SELECT="not synth and not collate"
fi

# caps in priority order (seconds); CAPS="step=seconds ..." overrides some
declare -A CAP=([env]=10 [wheels]=20 [shim]=10 [kernel_tests]=60 [kernel_bench]=110 [logprob]=25 [score]=45
                [grpo]=60 [grpo_tiny]=40 [native]=50 [sample]=60 [train_reward]=120 [train_grpo]=240 [train_sft]=200)
ORDER=(env wheels shim kernel_tests kernel_bench logprob score grpo_tiny grpo native sample train_reward train_grpo
       train_sft)
for kv in ${CAPS:-}; do
  [[ -n "${CAP[${kv%%=*}]:-}" ]] || { echo "gpu_check: CAPS names an unknown step '${kv%%=*}'"; exit 2; }
  CAP[${kv%%=*}]=${kv#*=}
done
want() { [[ " $STEPS " == *" $1 "* ]]; }
total=0; for s in "${ORDER[@]}"; do want "$s" && total=$(( total + CAP[$s] )); done
if (( total > BUDGET )); then echo "gpu_check: the step caps add up to ${total}s, over BUDGET=${BUDGET}s"; exit 2; fi
for s in "${ORDER[@]}"; do CAP[$s]=$(( CAP[$s] * SCALE )); done
BUDGET=$(( BUDGET * SCALE )); total=$(( total * SCALE ))

t0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
# left STEP: seconds STEP may take: its cap, or what is left of the budget if less.
left() { local rest=$(( BUDGET - ($(date +%s) - t0) )); (( rest < 5 )) && rest=5; (( rest < CAP[$1] )) && echo $rest || echo "${CAP[$1]}"; }
stamp "plan: ${STEPS} (caps ${total}s of a ${BUDGET}s budget, x${SCALE}; rehearsal=${REHEARSAL}; results in $RES)"
if [ "${PLAN_ONLY:-0}" = 1 ]; then
  for s in "${ORDER[@]}"; do want "$s" && echo "  $s: cap ${CAP[$s]}s"; done
  exit 0
fi

if want env; then
  stamp "env"
  if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else echo "no nvidia-smi"; fi
  timeout "$(left env)" $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
fi

if want wheels; then
  stamp "wheels"
  if compgen -G ".whl/*.whl" > /dev/null; then
    timeout "$(left wheels)" $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ folder (the kernel steps need none)"
  fi
fi

if want shim; then
  stamp "shim"
  rm -rf "$SHIM" && mkdir -p "$SHIM/spatialcore"
  for f in "$ROOT"/spatialcore/*; do ln -s "$f" "$SHIM/spatialcore/$(basename "$f")"; done
  for d in kernels trainers profiling; do ln -s "$ROOT/$d" "$SHIM/spatialcore/$d"; done
  rm -f "$SHIM"/spatialcore/_C*.so
  export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
  if ! $PY -c "import spatialcore.kernels as k, sys; p = k.__file__; print('spatialcore.kernels from', p); sys.exit(not p.startswith('$SHIM'))"; then
    echo "gpu_check: spatialcore does not import from the shim; stopping"; exit 3
  fi
fi
$PY -c "import diffusers, torchao" 2>/dev/null || echo "WARNING: diffusers/torchao missing: carry .whl (device-wheels.sh)"
SC="$PY -m spatialcore.cli"

if want kernel_tests; then
  stamp "kernel_tests ($([ "$REHEARSAL" = 1 ] && echo 'Triton interpreter, a subset' || echo 'compiled Triton'))"
  # compiling Triton kernels for every parametrisation is CPU work: spread it over pytest-xdist workers where present
  XDIST=(); [ "$REHEARSAL" != 1 ] && $PY -c "import xdist" 2>/dev/null && XDIST=(-n "${KERNEL_TEST_WORKERS:-8}")
  # -v: one line per finished test; SPATIALCORE_FAILURE_LOG (tests/conftest.py): each failure's traceback the
  # moment it fails, so a run stopped by its cap still says which tests failed and why
  SPATIALCORE_FAILURE_LOG=$RES/kernel_failures.log timeout "$(left kernel_tests)" $PY -m pytest -v -p no:cacheprovider \
    -ra "${XDIST[@]}" tests/test_kernels_cuda.py tests/test_advantages.py tests/test_sde_step.py tests/test_grpo_loss.py \
    tests/test_reward_head.py "${KERNEL_SELECT[@]}" > "$RES/kernel_tests.log" 2>&1
  echo "kernel tests exit $?: $(grep -c 'PASSED' "$RES/kernel_tests.log") passed, $(grep '^=== ' "$RES/kernel_failures.log" 2>/dev/null | sort -u | wc -l) failed"
  # under xdist a failure is logged by its worker and again by the controller: one line each
  grep '^=== ' "$RES/kernel_failures.log" 2>/dev/null | sort -u | head -20
fi

if want kernel_bench; then
  stamp "kernel_bench"
  SPATIALCORE_BENCH_JSON=$RES/kernels.json timeout "$(left kernel_bench)" $PY -m pytest -q -p no:cacheprovider \
    profiling/benchmarks -k "$BENCH_SELECT" --benchmark-only --benchmark-columns=median,iqr,rounds \
    > "$RES/kernel_bench.log" 2>&1
  echo "kernel bench exit $?"
  if [ -f "$RES/kernels.json" ]; then $PY -m spatialcore.profiling.kernel_report "$RES/kernels.json" > "$RES/kernels.md"; fi
fi

suite() {  # suite STEP NAME ARGS...: `spatialcore bench NAME` into $RES (STEP.json, STEP.md, STEP.log)
  local step=$1 name=$2; shift 2
  stamp "$step"
  # BLOCKING_STEPS="grpo ...": those steps run with CUDA_LAUNCH_BLOCKING=1, so a device fault names its kernel
  local blocking=0; [[ " ${BLOCKING_STEPS:-} " == *" $step "* ]] && blocking=1
  CUDA_LAUNCH_BLOCKING=$blocking timeout "$(left "$step")" $SC bench "$name" "$@" --out "$RES/$step" > "$RES/$step.log" 2>&1
  echo "$step exit $?"; tail -2 "$RES/$step.log"
  for f in "$RES/$step"/*; do [ -f "$f" ] && mv "$f" "$RES/$step.${f##*.}"; done; rmdir "$RES/$step" 2>/dev/null
}
want logprob && suite logprob logprob --shape "$SHAPE" "${DEVICE[@]}" --reps 1
want score && suite score score --shape "$SHAPE" "${DEVICE[@]}" --reps 5 --warmup 2
# the Spatial-RL step at tiny shapes on the GPU: seconds, and a fault there is a fault of the project's code path
want grpo_tiny && suite grpo_tiny grpo --shape tiny --device "$([ "$REHEARSAL" = 1 ] && echo cpu || echo cuda)" --reps 2
# one timed step after the warm-up one at full shape (each is a 16-step sample and a 4-timestep backward)
want grpo && suite grpo grpo --shape "$SHAPE" "${DEVICE[@]}" --reps "${GRPO_REPS:-1}"

if want native; then
  stamp "native (cmake + nvcc, sm_90a)"
  build=/tmp/sc-build-$$
  if [ "$REHEARSAL" = 1 ]; then
    # configure only: compiling takes minutes on a CPU machine (tests/test_native.py compiles it there)
    if timeout "$(left native)" cmake -S . -B "$build" -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" \
         -DSPATIALCORE_LIB_DIR="$SHIM/spatialcore" > "$RES/native.log" 2>&1; then
      echo "native: configured (rehearsal: not compiled)"
    else
      echo "native: configure FAILED (tail of native.log):"; tail -20 "$RES/native.log"
    fi
  elif timeout "$(left native)" bash -c "cmake -S . -B '$build' -G Ninja -DPython3_EXECUTABLE='$(command -v $PY)' \
         -DSPATIALCORE_LIB_DIR='$SHIM/spatialcore' && cmake --build '$build' -j 16" > "$RES/native.log" 2>&1 \
       && compgen -G "$SHIM/spatialcore/_C*.so" > /dev/null; then
    echo "native: built $(ls "$SHIM"/spatialcore/_C*.so)"
    SPATIALCORE_BENCH_JSON=$RES/kernels_native.json timeout "$(left native)" $PY -m pytest -q -p no:cacheprovider \
      tests/test_kernels_cuda.py -k group_advantages profiling/benchmarks/test_bench_advantages.py --benchmark-only \
      >> "$RES/native.log" 2>&1
    echo "native tests + bench exit $?"
  else
    echo "native: build FAILED (no _C library; tail of native.log):"; tail -20 "$RES/native.log"
  fi
fi

if want sample; then
  if [ "$SHAPE" = full ]; then
    suite sample sample --shape "$SHAPE" --reps 2 --warmup 0 'sizes=[1024]' \
      'variants=["eager","stock","compile-regional","rl-eager","rl-compile","compile-fp8-graphs","compile-full","compile-fp8"]'
  else
    suite sample sample --shape "$SHAPE" "${DEVICE[@]}" --reps 1 --warmup 0
  fi
fi

train() {  # train STEP VERB CONFIG ARGS...: a reference config run as launched (stopped after its first step and
           # resumed), its numbers in $RES/STEP.md; the run folder's large files (checkpoints, export) are not kept
  local step=$1 verb=$2 config=$3; shift 3
  stamp "$step"
  local run=/tmp/sc-$step-$$
  timeout "$(left "$step")" $SC "$verb" train --config "$config" "$@" stop_after=1 --out "$run" > "$RES/$step.log" 2>&1
  echo "$step first start exit $?"
  timeout "$(left "$step")" $SC "$verb" train --config "$config" "$@" --out "$run" >> "$RES/$step.log" 2>&1
  echo "$step resume exit $?"; grep -E "resumed from|done:|Error|error" "$RES/$step.log" | tail -3
  $PY -m spatialcore.profiling.run_report "$run" "$step: $verb train --config $config $*" > "$RES/$step.md" 2>>"$RES/$step.log"
  cp "$run/metrics.jsonl" "$RES/$step.metrics.jsonl" 2>/dev/null; rm -rf "$run"
}
if [ "$SHAPE" = full ]; then
  QWEN=random:qwen2.5-vl-7b; FLUX=random:flux.1-dev
  REWARD_SIZE=(batch_size=16 micro_batch=4); GRPO_SIZE=(group_size=12 top_k=3 prompts_per_iter=1)
  SFT_SIZE=(batch_size=8 micro_batch=4); GPU_ONLY=()
else
  QWEN=random:tiny-qwen; FLUX=random:tiny-flux
  REWARD_SIZE=(batch_size=4 micro_batch=2 threads=2); GRPO_SIZE=(group_size=4 top_k=1 sampler.image_size=32 threads=2)
  SFT_SIZE=(batch_size=4 micro_batch=2 image_size=32 threads=2); GPU_ONLY=(spatialscore.liger=false)
fi
# one GPU stands for one of the configs' 8 ranks: smaller global batches; sampling eager (compile: bench sample)
want train_reward && train train_reward reward configs/reward/qwen2_5_vl_7b.yaml model=$QWEN data.source=stream:hard \
  max_steps=3 optim.warmup_steps=1 eval_every=3 save_every=1 data.eval_pairs=8 data.num_workers=2 "${REWARD_SIZE[@]}" "${GPU_ONLY[@]}"
want train_grpo && train train_grpo grpo configs/grpo/flux_dev_spatial.yaml model=$FLUX reward.spatialscore.model=$QWEN \
  iterations=2 eval_every=2 eval_seeds=1 save_every=1 n_stream_prompts=64 sampler.compile=none "${GRPO_SIZE[@]}"
want train_sft && train train_sft sft configs/sft/flux_dev_lora.yaml model=$FLUX data.source=synthetic data.preset=hard \
  steps=2 eval_every=2 eval_seeds=1 save_every=1 sample_steps=8 "${SFT_SIZE[@]}"

stamp "summary"
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) (rehearsal=$REHEARSAL, shape=$SHAPE, steps: $STEPS)"
  echo
  if [ -f "$RES/kernel_tests.log" ]; then
    echo "kernel tests: $(grep -E '(passed|failed|error).* in [0-9.]+s' "$RES/kernel_tests.log" | tail -1 ||
      echo "stopped by the cap after $(grep -c 'PASSED' "$RES/kernel_tests.log") passed")"
    if [ -s "$RES/kernel_failures.log" ]; then echo; echo "failed:"; grep '^=== ' "$RES/kernel_failures.log" | sort -u | head -40; fi
    echo
  fi
  [ -f "$RES/kernels.md" ] && { cat "$RES/kernels.md"; echo; }
  for s in logprob score grpo_tiny grpo sample train_reward train_grpo train_sft; do
    if [ -f "$RES/$s.md" ]; then cat "$RES/$s.md"; elif want "$s"; then echo "(no $s.md: see $s.log)"; fi
  done
} > "$RES/summary.md"
cat "$RES/summary.md"
cp "$RES/summary.md" "$OUT/summary.md"
tar czf "$OUT/gpu_check.tgz" -C "$RES" .
rm -rf "$SHIM"
stamp "done: $OUT/summary.md, $OUT/gpu_check.tgz"

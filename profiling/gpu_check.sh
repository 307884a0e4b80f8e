#!/usr/bin/env bash
# One-call GPU check (a BUDGET of 520 s, inside a 9-minute call, on an H100/H200), in priority order:
#   1. environment facts (GPU, driver, torch, triton);
#   2. install carried wheels from .whl/ (diffusers, torchao, liger-kernel: fetch them first with
#      ../shared/tools/device-wheels.sh, and name .whl in the device call's carry);
#   3. make `spatialcore` importable without installing (a symlink shim);
#   4. build the native extension spatialcore._C with CMake + nvcc for sm_90a;
#   5. run the CUDA kernel tests against the references;
#   6. run the kernel microbenchmarks (CUDA events over CUDA-graph replays);
#   7. `spatialcore bench score --shape full`: Qwen2.5-VL-7B-shaped SpatialScore vs the stock path;
#   8. `spatialcore bench grpo --shape full`: one Spatial-RL step, FLUX.1-dev + Qwen2.5-VL-7B shapes;
#   9. `spatialcore bench sample --shape full`: FLUX.1-dev sampling eager vs compiled / float8;
#  10. print the tables last.
# Usage on the GPU machine, from the repo root:  bash profiling/gpu_check.sh
# Results land in $OUT (or /tmp/gpu_check): bench.json, tests.log, bench.log, build.log, score/grpo/sample .json/.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 SPATIALCORE_PROGRESS=0
PY=${PYTHON:-python3}
t0=$(date +%s)
BUDGET=${BUDGET:-520}  # seconds for the whole check (9-minute device calls leave a margin)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
# left CAP: seconds a step may take: its cap, or what is left of the budget if less.
left() { local rest=$(( BUDGET - ($(date +%s) - t0) )); (( rest < 5 )) && rest=5; (( rest < $1 )) && echo $rest || echo $1; }

stamp "1/10 environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

stamp "2/10 carried wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ folder: kernels need none"
fi

stamp "3/10 import shim"
SHIM=/tmp/spatialcore-shim
rm -rf "$SHIM" && mkdir -p "$SHIM/spatialcore"
for f in "$ROOT"/spatialcore/*; do ln -s "$f" "$SHIM/spatialcore/$(basename "$f")"; done
for d in kernels trainers profiling; do ln -s "$ROOT/$d" "$SHIM/spatialcore/$d"; done
rm -f "$SHIM/spatialcore/_C.so"
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import spatialcore.kernels as k; print('spatialcore.kernels from', k.__file__)"

stamp "4/10 native extension (cmake + nvcc, sm_90a)"
if timeout "$(left 120)" cmake -S . -B /tmp/sc-build -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" \
     -DSPATIALCORE_LIB_DIR="$SHIM/spatialcore" > "$OUT/build.log" 2>&1 \
   && timeout "$(left 150)" cmake --build /tmp/sc-build -j 16 >> "$OUT/build.log" 2>&1; then
  echo "built $SHIM/spatialcore/_C.so"
else
  echo "native build FAILED (tail of build.log):"; tail -20 "$OUT/build.log"
fi

stamp "5/10 CUDA kernel tests"
timeout "$(left 120)" $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py -ra > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -5 "$OUT/tests.log"

stamp "6/10 kernel benchmarks"
SPATIALCORE_BENCH_JSON=$OUT/bench.json timeout "$(left 100)" $PY -m pytest -q -p no:cacheprovider profiling/benchmarks \
  --benchmark-only --benchmark-columns=median,iqr,rounds > "$OUT/bench.log" 2>&1
echo "bench exit $?"

SC="$PY -m spatialcore.cli"
$PY -c "import diffusers, torchao" 2>/dev/null || echo "WARNING: diffusers/torchao missing: carry .whl (device-wheels.sh)"
stamp "7/10 bench score (Qwen2.5-VL-7B shape, batch 24, 512², ~80-token prompts)"
timeout "$(left 100)" $SC bench score --shape full --out "$OUT" --reps 5 --warmup 2 > "$OUT/score.log" 2>&1
echo "score exit $?"; tail -3 "$OUT/score.log"
stamp "8/10 bench grpo (FLUX.1-dev + Qwen2.5-VL-7B shapes, one rank's share of G=24)"
timeout "$(left 120)" $SC bench grpo --shape full --out "$OUT" --reps 2 > "$OUT/grpo.log" 2>&1
echo "grpo exit $?"; tail -3 "$OUT/grpo.log"
stamp "9/10 bench sample (FLUX.1-dev shape, 1024² 28 steps; RL sampler 512² 16 steps)"
# priority order; every finished row is written at once, so a time limit keeps what ran
timeout "$(left 230)" $SC bench sample --shape full --out "$OUT" --reps 2 --warmup 0 --set 'sizes=[1024]' \
  --set 'variants=["eager","compile-regional","rl-eager","rl-compile","compile-fp8-graphs","compile-full","compile-fp8"]' \
  > "$OUT/sample.log" 2>&1
echo "sample exit $?"; tail -3 "$OUT/sample.log"

stamp "10/10 summary"
grep -E "passed|failed" "$OUT/tests.log" | tail -1
if [ -f "$OUT/bench.json" ]; then
  $PY -m spatialcore.profiling.kernel_report "$OUT/bench.json" | tee "$OUT/summary.txt"
else
  echo "no bench.json (see bench.log):"; tail -30 "$OUT/bench.log"
fi
for s in score grpo sample; do [ -f "$OUT/$s.md" ] && cat "$OUT/$s.md" || echo "(no $s.md: see $OUT/$s.log)"; done
stamp "done"

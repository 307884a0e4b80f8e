#!/usr/bin/env bash
# One-call GPU check for the kernels (a BUDGET of 470 s, inside an 8-minute call, on an H100/H200):
#   1. environment facts (GPU, driver, torch, triton);
#   2. install carried wheels from .whl/ (if any) beside the machine's own packages;
#   3. make `spatialcore` importable without installing (a symlink shim);
#   4. build the native extension spatialcore._C with CMake + nvcc for sm_90a;
#   5. run the CUDA kernel tests against the references;
#   6. run the kernel microbenchmarks (CUDA events over CUDA-graph replays);
#   7. print the target table last.
# Usage on the GPU machine, from the repo root:  bash profiling/gpu_check.sh
# Results land in $OUT (or /tmp/gpu_check): bench.json, tests.log, bench.log, build.log.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 SPATIALCORE_PROGRESS=0
PY=${PYTHON:-python3}
t0=$(date +%s)
BUDGET=${BUDGET:-470}  # seconds for the whole check (8-minute device calls leave a margin)
stamp() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*"; }
# left CAP: seconds a step may take: its cap, or what is left of the budget if less.
left() { local rest=$(( BUDGET - ($(date +%s) - t0) )); (( rest < 5 )) && rest=5; (( rest < $1 )) && echo $rest || echo $1; }

stamp "1/7 environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

stamp "2/7 carried wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ folder: kernels need none"
fi

stamp "3/7 import shim"
SHIM=/tmp/spatialcore-shim
rm -rf "$SHIM" && mkdir -p "$SHIM/spatialcore"
for f in "$ROOT"/spatialcore/*; do ln -s "$f" "$SHIM/spatialcore/$(basename "$f")"; done
for d in kernels trainers profiling; do ln -s "$ROOT/$d" "$SHIM/spatialcore/$d"; done
rm -f "$SHIM/spatialcore/_C.so"
export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import spatialcore.kernels as k; print('spatialcore.kernels from', k.__file__)"

stamp "4/7 native extension (cmake + nvcc, sm_90a)"
if timeout "$(left 120)" cmake -S . -B /tmp/sc-build -G Ninja -DPython3_EXECUTABLE="$(command -v $PY)" \
     -DSPATIALCORE_LIB_DIR="$SHIM/spatialcore" > "$OUT/build.log" 2>&1 \
   && timeout "$(left 150)" cmake --build /tmp/sc-build -j 16 >> "$OUT/build.log" 2>&1; then
  echo "built $SHIM/spatialcore/_C.so"
else
  echo "native build FAILED (tail of build.log):"; tail -20 "$OUT/build.log"
fi

stamp "5/7 CUDA kernel tests"
timeout "$(left 120)" $PY -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py -ra > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -5 "$OUT/tests.log"

stamp "6/7 kernel benchmarks"
SPATIALCORE_BENCH_JSON=$OUT/bench.json timeout "$(left $(( BUDGET - 20 )))" $PY -m pytest -q -p no:cacheprovider profiling/benchmarks \
  --benchmark-only --benchmark-columns=median,iqr,rounds > "$OUT/bench.log" 2>&1
echo "bench exit $?"

stamp "7/7 summary"
grep -E "passed|failed" "$OUT/tests.log" | tail -1
if [ -f "$OUT/bench.json" ]; then
  $PY -m spatialcore.profiling.kernel_report "$OUT/bench.json" | tee "$OUT/summary.txt"
else
  echo "no bench.json (see bench.log):"; tail -30 "$OUT/bench.log"
fi

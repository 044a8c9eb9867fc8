#!/bin/bash
# The prepared GPU check (issue 21 §2, issue 18's CUDA timings), one run on a lent GPU machine:
#   here, once per session:  bash bench/device_wheels.sh        (the few packages the device image lacks → .whl/)
#   device tool:             run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=560)
# It installs the wheels, makes cryopool importable without installing it, runs the device tests (CPU against
# CUDA, --noconftest: the suite's conftest needs the server stack), bench/bench_cuda.py and the time-to-result
# population refined end to end on CUDA (bench/bench_time_to_result.py --device cuda), and leaves the logs in $OUT.
# Every step has its own time limit so one stuck step leaves the rest.
set -o pipefail
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheels missing: run bench/device_wheels.sh here and carry .whl"; exit 1; }
mkdir -p /tmp/ns/cryopool
for p in repo engine cli; do ln -sfn "$PWD/$p" "/tmp/ns/cryopool/$p"; done
export PYTHONPATH=/tmp/site:/tmp/ns PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# STEPS picks the checks (default: all four, ~6 min on an H200); each has its own time limit
STEPS=${STEPS:-"tests bench profile ttr"}
if [[ $STEPS == *tests* ]]; then
  timeout 90 python3 -m pytest -q -s --noconftest -p no:cacheprovider tests/engine/test_devices.py 2>&1 \
      | tee "$OUT/device_tests.log"
fi
[[ $STEPS == *bench* ]] && timeout 140 python3 bench/bench_cuda.py 2>&1 | tee "$OUT/bench_cuda.log"
if [[ $STEPS == *profile* ]]; then  # one tilt series, 2 iterations, under py-spy: where the time goes
  timeout 120 /tmp/site/bin/py-spy record --subprocesses --rate 50 --format raw -o "$OUT/ttr_cuda_profile.txt" -- \
      python3 bench/bench_time_to_result.py --no-baseline --device cuda --items 1 --iterations 2 2>&1 \
      | tee "$OUT/ttr_cuda_profile.log"
fi
if [[ $STEPS == *ttr* ]]; then  # the whole time-to-result population (3 tilt series, 3 iterations)
  timeout 200 python3 bench/bench_time_to_result.py --no-baseline --device cuda 2>&1 | tee "$OUT/time_to_result.log"
fi

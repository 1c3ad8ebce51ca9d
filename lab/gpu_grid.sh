#!/bin/bash
# One of lab/tune.py's grids on a lent GPU, within one call of the device tool: many runs at once
# (CUDA MPS where it starts), stopped at a deadline, what finished sent back under $OUT.
#
#   bash lab/gpu_grid.sh round2-gpu              # on the GPU machine, from the repository root
#   DEADLINE=540 JOBS=14 bash lab/gpu_grid.sh GRID [any lab/tune.py flag]
#
# Carry the data as .gpudata/cifar10-jpeg.tar.gz (or set CIFAR10_DATA) and the wheels the GPU's
# image lacks as .whl/ (../shared/gpu/README.md). A run's results file is written as it
# finishes and its checkpoint each epoch, so a second call on the same warm machine resumes the
# runs the deadline stopped. $OUT gets machine.txt, plan_before.txt and plan_after.txt
# (lab/tune.py --list), grid.tgz (the new results files and every log) and tune.log's last lines.
set -u
start=$(date +%s)
GRID=${1:?usage: bash lab/gpu_grid.sh GRID [lab/tune.py flags]}; shift
DEADLINE=${DEADLINE:-540}   # seconds after the start at which the grid is stopped
PYTHON=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder that goes back (the device tool sets it)}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export CIFAR10_DATA=${CIFAR10_DATA:-$PWD/.gpudata/cifar10-jpeg.tar.gz}
[ -e "$CIFAR10_DATA" ] || { echo "error: no data at $CIFAR10_DATA: carry .gpudata/cifar10-jpeg.tar.gz or set CIFAR10_DATA"; exit 2; }
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
mkdir -p runs/logs/tuning
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  lscpu | grep 'Model name'; nproc --all; "$PYTHON" -c "import torch; print(torch.__version__)"; } > "$OUT/machine.txt" 2>&1
"$PYTHON" -m lab.tune --grid "$GRID" --list > "$OUT/plan_before.txt" 2>&1 || { cat "$OUT/plan_before.txt"; exit 1; }
# decode the images into the cache once, before many runs would each try to
"$PYTHON" -c "from dataset import load_cifar10; load_cifar10()" > runs/data_cache.log 2>&1 || { tail -3 runs/data_cache.log; exit 1; }

MPS=off
if [ -z "${JOBS:-}" ]; then
  JOBS=8
  if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
    # MPS lets the runs' kernels share the GPU at once; keep it only where a CUDA step works
    if timeout 60 "$PYTHON" -c "import torch; m = torch.nn.Conv2d(3, 8, 3).cuda(); m(torch.randn(2, 3, 8, 8, device='cuda')).sum().backward(); torch.cuda.synchronize()"; then
      JOBS=14; MPS=on
    else
      echo quit | nvidia-cuda-mps-control; sleep 2
    fi
  fi
fi
echo "grid=$GRID mps=$MPS jobs=$JOBS setup_s=$(( $(date +%s) - start ))" | tee -a "$OUT/machine.txt"
nvidia-smi dmon -s u -d 10 > runs/dmon.txt 2>&1 &
dmon=$!

left=$(( DEADLINE - ($(date +%s) - start) ))
timeout -s TERM "$left" "$PYTHON" -m lab.tune --grid "$GRID" --jobs "$JOBS" "$@" > runs/tune.log 2>&1 &
tune=$!
trap 'kill -TERM $tune 2>/dev/null' TERM INT  # stopped early: stop the grid, still send back
wait $tune; rc=$?
wait $tune 2>/dev/null
echo "tune exit $rc at $(( $(date +%s) - start )) s" | tee -a runs/tune.log
kill $dmon 2>/dev/null
[ "$MPS" = on ] && echo quit | nvidia-cuda-mps-control

"$PYTHON" -m lab.tune --grid "$GRID" --list > "$OUT/plan_after.txt" 2>&1
find results -type f -newer "$OUT/machine.txt" > runs/new_files.txt
tar czf "$OUT/grid.tgz" -T runs/new_files.txt runs/tune.log runs/dmon.txt runs/data_cache.log runs/logs/tuning
tail -5 "$OUT/plan_after.txt"; tail -3 runs/tune.log

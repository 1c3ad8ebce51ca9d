#!/bin/bash
# The lever grid (tools/tune.py --grid levers) on a lent GPU, within one call: results come back
# as one tarball under $OUT. Deadline: tune stopped at DEADLINE s after this script starts.
DEADLINE=${DEADLINE:-520}
start=$(date +%s)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/torchsummary-*.whl || exit 1
export PYTHONPATH=/tmp/site CIFAR10_DATA=$PWD/.gpudata/cifar10-jpeg.tar.gz
mkdir -p runs/logs/tuning results/levers-h200
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; lscpu | grep 'Model name'; nproc --all; python3 -c "import torch; print(torch.__version__)"; } > $OUT/machine.txt 2>&1
python3 -c "from dataset import load_cifar10; load_cifar10()" > runs/data_cache.log 2>&1
JOBS=8; MPS=off
if command -v nvidia-cuda-mps-control >/dev/null; then
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; m = torch.nn.Conv2d(3, 8, 3).cuda(); m(torch.randn(2, 3, 8, 8, device='cuda')).sum().backward(); torch.cuda.synchronize()"; then
    JOBS=14; MPS=on
  else
    echo quit | nvidia-cuda-mps-control; sleep 2
  fi
fi
echo "mps=$MPS jobs=$JOBS setup_s=$(( $(date +%s) - start ))" | tee -a $OUT/machine.txt
nvidia-smi dmon -s u -d 10 > runs/dmon.txt 2>&1 &
timeout 300 python3 -m pytest -m cuda -q -p no:cacheprovider -o addopts= tests/test_cuda.py > runs/tests_cuda.log 2>&1 &
left=$(( DEADLINE - ($(date +%s) - start) ))
timeout -s TERM $left python3 tools/tune.py --grid levers --jobs $JOBS > runs/tune.log 2>&1
echo "tune exit $? at $(( $(date +%s) - start )) s" >> runs/tune.log
tar czf $OUT/levers.tgz results/levers-h200 runs/tune.log runs/dmon.txt runs/tests_cuda.log runs/data_cache.log runs/logs/tuning
ls results/levers-h200 | wc -l

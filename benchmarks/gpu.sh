#!/bin/bash
# The checks that need a CUDA GPU, in one go: the GPU tests (fused and autograd engines, the icd learner,
# each against the CPU), then both learners' training at 10M and 100M generated interactions
# (benchmarks/train_scale.py), and the icd learner at 10M again with times and the default recency boost, as a
# run with a time column trains. Results go to the folder given (default gpu-out/): gpu.txt, tests.log,
# bench10m.json / .err, bench10m_boost.json / .err, bench100m.json / .err. Runs with whatever python3 holds
# torch with CUDA; about seven minutes on one H200, most of it generating the 100M rows.
#
#     bash benchmarks/gpu.sh /tmp/gpu-out
set -u
out=${1:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import sys, torch, numpy; print(sys.version, torch.__version__, numpy.__version__, torch.cuda.is_available())" \
    | tee -a "$out/gpu.txt"
lscpu | grep -i "model name" | tee -a "$out/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests/unit/test_fm_fused.py tests/unit/test_fm.py \
    tests/unit/test_icd.py 2>&1 | tee "$out/tests.log" | tail -15
timeout 90 python3 -m benchmarks.train_scale --interactions 10000000 --users 1000000 --items 100000 --epochs 2 \
    --device cuda > "$out/bench10m.json" 2> "$out/bench10m.err"
tail -4 "$out/bench10m.err"; cat "$out/bench10m.json"
timeout 90 python3 -m benchmarks.train_scale --interactions 10000000 --users 1000000 --items 100000 --epochs 2 \
    --learners icd --recency-boost 0.75 --device cuda > "$out/bench10m_boost.json" 2> "$out/bench10m_boost.err"
tail -4 "$out/bench10m_boost.err"; cat "$out/bench10m_boost.json"
timeout 330 python3 -m benchmarks.train_scale --interactions 100000000 --users 5000000 --items 200000 --epochs 2 \
    --device cuda > "$out/bench100m.json" 2> "$out/bench100m.err"
echo "rc=$?"; tail -4 "$out/bench100m.err"; cat "$out/bench100m.json"

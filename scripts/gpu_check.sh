#!/usr/bin/env bash
# The GPU check of the Triton kernels and the GPU benchmarks, run once on a machine with CUDA
# (each step under a time limit: 2 + 2.5 + 3.5 minutes, 8 in all), from the repository root:
#
#     OUT=/some/folder scripts/gpu_check.sh
#
# 1. correctness: the CUDA tests of the kernels, the benchmarks and the memory formats
#    (pytest -k "triton or cuda"; the interpreted tests are CPU-only and left to the CPU suite);
# 2. the op table on CUDA (python -m structvit.bench op --device cuda), page $OUT/performance-gpu.md;
# 3. the training-step table on CUDA in bf16 (bench model --device cuda --precision bf16-mixed),
#    page $OUT/performance-gpu-model.md; logs in $OUT/*.log. The pages are rewritten after every
#    case / row, so a step stopped at its limit keeps what it measured.
# Through the device tool: run(command="OUT=$OUT scripts/gpu_check.sh", timeout_s=540); no carry.
#
# Runs the project from src/ (PYTHONPATH=src) with $PYTHON (default python3). Without CUDA it runs
# the same steps on the CPU with the smallest cases (so that the plumbing is exercised), says
# so, and exits 2: nothing measured there stands for the GPU. Exit 1: a step failed.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/structvit-gpu-check}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "=== $name: ok ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAILED ($((SECONDS - start)) s)"
        failed=1
    fi
}

if ! cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>&1); then
    echo "cannot import torch with $PYTHON: $cuda"
    exit 1
fi
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    || echo "(Triton is not importable: the kernels' tests skip)"
[ "$cuda" = 1 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

step tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/ops/test_triton_conv.py tests/ops/test_triton_dwconv.py \
    tests/bench/test_bench.py tests/nn/test_channels_last.py -k "(triton or cuda) and not test_triton_interpreted"

if [ "$cuda" = 1 ]; then
    step op 150 "$PYTHON" -m structvit.bench op --device cuda --repeats 5 --write "$OUT/performance-gpu.md"
    step model 210 "$PYTHON" -m structvit.bench model --device cuda --what train --precision bf16-mixed --repeats 3 \
        --write "$OUT/performance-gpu-model.md"
else
    echo "no CUDA here: the tables run on the CPU with the smallest cases, to check the plumbing only"
    step op 240 "$PYTHON" -m structvit.bench op --cases tiny_c --backends keyconv keyconv-torch sa-keys --repeats 1 \
        --no-memory --write "$OUT/performance-gpu.md"
    step model 300 "$PYTHON" -m structvit.bench model --what train --models structvit_tiny --image-batch 2 --repeats 1 \
        --write "$OUT/performance-gpu-model.md"
fi

for page in performance-gpu.md performance-gpu-model.md; do
    [ -s "$OUT/$page" ] || { echo "missing: $OUT/$page"; failed=1; }
done
if [ "$failed" = 1 ]; then
    echo "gpu_check: a step FAILED (logs in $OUT)"
    exit 1
fi
if [ "$cuda" != 1 ]; then
    echo "gpu_check: no CUDA, nothing measured on a GPU (the plumbing ran; pages in $OUT)"
    exit 2
fi
echo "gpu_check: done (pages and logs in $OUT)"

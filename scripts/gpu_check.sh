#!/usr/bin/env bash
# One prepared GPU session (about 9 minutes on an H100, plus up to 8 for the ResNet-18 CIFAR
# stages): kernel correctness with compiled Triton kernels, then the three benchmarks on their
# own shapes and on ResNet-18's CIFAR stages (issue 12), every result written under $OUT
# (default runs/gpu) as at most 15 files. Run from the repository root on the GPU machine, where
# torch and triton are installed but dynconv is not:  bash scripts/gpu_check.sh
# Locally (no GPU), DEVICE=cpu QUICK=1 runs the same steps as a smoke test.
set -u
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
log="$OUT/env_and_tests.txt"

{
  date -u; git rev-parse --short HEAD 2>/dev/null; nvidia-smi -L 2>/dev/null
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} > "$log" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "## $name: exit $? after $((SECONDS - t0)) s" >> "$log"
}

# 1. correctness of the compiled kernels against the float64 reference (CondConv, involution first:
#    their GPU runs are the newest), then the switched-conv kernels and the custom-op checks
step "tests condconv+involution" 150 $PY -m pytest -q -x -p no:cacheprovider \
  tests/ops/condconv/test_condconv_backends.py tests/ops/condconv/test_condconv_auto.py \
  tests/ops/involution/test_involution_backends.py tests/ops/test_partial_gradients.py >> "$log" 2>&1
step "tests switched" 120 $PY -m pytest -q -x -p no:cacheprovider \
  tests/ops/switched tests/ops/test_condconv_involution_opcheck.py >> "$log" 2>&1

# 2. benchmarks: markdown tables on stdout, rows + environment in JSON
quick=${QUICK:+--quick}
step "bench condconv" 90 $PY -m dynconv.bench condconv --device "$DEVICE" $quick --json "$OUT/condconv.json" > "$OUT/condconv.md" 2>&1
step "bench involution" 90 $PY -m dynconv.bench involution --device "$DEVICE" $quick --json "$OUT/involution.json" > "$OUT/involution.md" 2>&1
step "bench switched" 150 $PY -m dynconv.bench switched --device "$DEVICE" $quick --json "$OUT/switched.json" > "$OUT/switched.md" 2>&1

# 3. ResNet-18's CIFAR stages (N128, C64 32x32 .. C512 4x4): CondConv (every backend and auto,
#    E = 4 and 8) in both layouts, involution (K3) and the switched conv (b = 8) at the same shapes
cifar="--shape-set resnet18-cifar"
step "bench condconv cifar" 150 $PY -m dynconv.bench condconv --device "$DEVICE" $quick $cifar \
  --json "$OUT/condconv_cifar.json" > "$OUT/condconv_cifar.md" 2>&1
step "bench condconv cifar nchw" 150 $PY -m dynconv.bench condconv --device "$DEVICE" $quick $cifar --no-channels-last \
  --json "$OUT/condconv_cifar_nchw.json" > "$OUT/condconv_cifar_nchw.md" 2>&1
step "bench involution cifar" 60 $PY -m dynconv.bench involution --device "$DEVICE" $quick $cifar \
  --json "$OUT/involution_cifar.json" > "$OUT/involution_cifar.md" 2>&1
step "bench switched cifar" 90 $PY -m dynconv.bench switched --device "$DEVICE" $quick $cifar --breadths 8 --dtypes bf16 \
  --json "$OUT/switched_cifar.json" > "$OUT/switched_cifar.md" 2>&1
cat "$log"

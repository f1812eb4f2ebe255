#!/usr/bin/env bash
# Every GPU number the GPU issues ask for, in one run on one GPU (about 10 minutes on an H200),
# on a bare machine: torch, torchvision, timm, triton, numpy, pillow, pyarrow, and the package
# from this checkout. Each step prints its own numbers and ratios; a failed step does not stop
# the others, and the script exits 1 if any failed.
#
# The GPU check (and tests/test_gpu.py) also need webdataset, braceexpand and cloudpickle,
# unpacked into carry/site, and prebuilt digits shards in digits_cache/: docs/gpu.md, "On a bare
# GPU machine", says how; both are picked up when present.
#
#   bash studies/gpu_acceptance.sh            # all steps
#   bash studies/gpu_acceptance.sh kernels    # one step: check, kernels, scaling, throughput,
#                                             # layout, loop, compile
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
[ -d carry/site ] && PYTHONPATH="$PYTHONPATH:$PWD/carry/site"
data=()
[ -d digits_cache ] && data=(--data-root digits_cache)
PY="${PYTHON:-python}"
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || failed+=("$name")
}

ONLY="${1:-}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# Issue 17: the digits CBT under NCCL through run_training (Ray where installed).
step check 240 "$PY" studies/gpu_check.py --epochs 3 "${data[@]}"
# Issue 18: the kernels against the equations on the GPU, then their scaling against SDPA.
step kernels 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cbsa_kernels.py
step scaling 300 "$PY" studies/attention_scaling.py --device cuda --levels mechanism \
  --sides 14,28,56,112,224 --rounds 10 --no-mlflow
# Issue 19: CBT against ViT/CRATE/ToST, eager and compiled.
headline=(--device cuda --resolutions 224,448 --modes train --no-mlflow
  --models cbt_tiny_patch16_224,vit_tiny_patch16_224,cbt_small_patch16_224,vit_small_patch16_224)
step throughput 420 "$PY" studies/throughput.py "${headline[@]}" --compile
# Issue 19: the same training rows with NHWC images and stems (train.channels_last), to read
# against the step above: whether the conv stem's BatchNorm and convolutions gain from it.
step layout 300 "$PY" studies/throughput.py "${headline[@]}" --channels-last
# Issue 17: the worker loop's per-step cost over a bare loop (CBT-S, bf16, batch 256).
step loop 240 "$PY" studies/bench_loop_overhead.py --device cuda --max-ratio 1.05
# Issues 17 and 19: every model compiles at 224 and 448 px, CBSA models with the kernels inside.
step compile 600 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_compile.py tests/test_gpu.py

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"

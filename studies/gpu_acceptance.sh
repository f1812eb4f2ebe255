#!/usr/bin/env bash
# Every GPU number the GPU issues ask for, on one GPU, most important first (issue 19's
# headline, then the checks of issues 17 and 18), within a time budget: a step runs only while
# the budget holds its estimate, so one call of a lent machine (10 minutes at most) returns
# whole steps rather than a killed one. The skipped steps are named at the end, with the
# command that goes on with them. Each step prints its own numbers and ratios; a failed step
# does not stop the others.
#
# Needs a bare machine only: torch, torchvision, timm, triton, numpy, pillow, pyarrow, and the
# package from this checkout. The `check` and `gpu-tests` steps also need webdataset, braceexpand
# and cloudpickle unpacked into carry/site, and prebuilt digits shards in digits_cache/: `make
# gpu-carry` makes both here, to carry over (docs/gpu.md); both are picked up when present.
#
#   bash studies/gpu_acceptance.sh                    # every step, in order, within BUDGET_S
#   bash studies/gpu_acceptance.sh --list             # the steps, their estimates, limits, commands
#   bash studies/gpu_acceptance.sh scaling loop       # these steps only
#   bash studies/gpu_acceptance.sh --from scaling     # this step and every later one
#   BUDGET_S=300 bash studies/gpu_acceptance.sh       # another budget (default 540 s)
#
# Exit status: 0 every step ran and passed, 1 a step failed, 3 none failed but the budget left
# some out, 2 the command line was wrong. A step that outlives its limit is stopped (SIGTERM,
# then SIGKILL 15 s later). The estimates are first guesses (no GPU has run this script yet):
# each step prints its time, so correct them from a run's "=== NAME: exit RC after S s" lines.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
[ -d carry/site ] && PYTHONPATH="$PYTHONPATH:$PWD/carry/site"
export PYTHONUNBUFFERED=1 # a step stopped at its limit still shows what it printed
data=()
[ -d digits_cache ] && data=(--data-root digits_cache)
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-540}"

tiny=cbt_tiny_patch16_224,vit_tiny_patch16_224
small=cbt_small_patch16_224,vit_small_patch16_224
train=(--device cuda --resolutions 224,448 --modes train --no-mlflow)

# name | estimate (s) | limit (s) | command (word-split; no quoting inside)
PLAN=(
  # Issue 19: CBT against ViT, T and S, eager: images/s, MFU and peak memory, and their ratios
  # (and the CBSA kernels' first autotuning, 8 configurations each, cached for later steps).
  "throughput|150|300|$PY studies/throughput.py ${train[*]} --models $tiny,$small"
  # Issue 19's headline: CBT-T against ViT-T, both compiled (eager rows beside them).
  "compiled|330|480|$PY studies/throughput.py ${train[*]} --models $tiny --compile"
  # Issue 18: the kernels against the equations on the GPU, in every dtype and head dim the
  # tests use: each a new autotuning (5 kernels x 8 configurations compiled), hence the time.
  "kernels|300|420|$PY -m pytest -q -x -p no:cacheprovider tests/test_cbsa_kernels.py"
  # Issue 19: where the step's time goes, CBT-T and ViT-T eager: each one's operations by
  # their kernels' time, and kernel launches per step (what to cut next, if a ratio falls short).
  "profile|90|240|$PY studies/throughput.py ${train[*]} --models $tiny --profile 15"
  # Issue 17: the digits CBT under NCCL through run_training (Ray where installed), its default
  # 5 epochs (after 3, 2 gloo ranks on a CPU reached 0.51 against the check's 0.5 floor).
  "check|120|240|$PY studies/gpu_check.py ${data[*]-}"
  # Issue 18: the mechanism's scaling against flash SDPA, 196 to 50,176 tokens.
  "scaling|150|300|$PY studies/attention_scaling.py --device cuda --levels mechanism --sides 14,28,56,112,224 --rounds 10 --no-mlflow"
  # Issue 19: CBT-S against ViT-S, both compiled.
  "compiled-small|330|480|$PY studies/throughput.py ${train[*]} --models $small --compile"
  # Issue 19: the training rows with NHWC images and stems (train.channels_last), to read
  # against the throughput step's: whether the conv stem's BatchNorm and convolutions gain.
  "layout|120|300|$PY studies/throughput.py ${train[*]} --models $tiny,$small --channels-last"
  # Issue 17: the worker loop's per-step cost over a bare loop (CBT-S, bf16, batch 256).
  "loop|90|240|$PY studies/bench_loop_overhead.py --device cuda --max-ratio 1.05"
  # Issue 17: run_training on the GPU (bf16, channels-last, checkpoints, two processes).
  "gpu-tests|150|300|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py"
  # Issues 17 and 19: every model compiles at 224 and 448 px (or falls back, saying why), then
  # the CBSA models with the kernels inside, plain and with CUDA graphs: about 40 compilations,
  # in four steps that each fit a budget.
  "compile-zoo-tiny|480|540|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_compile.py::test_every_model_trains_compiled_or_falls_back_with_the_reason -k tiny"
  "compile-zoo-small|480|540|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_compile.py::test_every_model_trains_compiled_or_falls_back_with_the_reason -k small"
  "compile-kernels-tiny|480|540|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_compile.py::test_cbsa_models_compile_with_the_kernels_inside -k tiny"
  "compile-kernels-small|480|540|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_compile.py::test_cbsa_models_compile_with_the_kernels_inside -k small"
)

names=()
for line in "${PLAN[@]}"; do names+=("${line%%|*}"); done

list=0
from=""
chosen=()
while [ $# -gt 0 ]; do
  case "$1" in
    --list) list=1 ;;
    --from)
      if [ -z "${2:-}" ]; then
        echo "gpu_acceptance.sh: --from takes a step's name" >&2
        exit 2
      fi
      from="$2"
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -uo/{/^set -uo/!p}' "$0"
      exit 0
      ;;
    *) chosen+=("$1") ;;
  esac
  shift
done
if [ -n "$from" ] && [ "${#chosen[@]}" -gt 0 ]; then
  echo "gpu_acceptance.sh: give either --from STEP or the steps to run, not both" >&2
  exit 2
fi
if ! [[ "$BUDGET_S" =~ ^[0-9]+$ ]]; then
  echo "gpu_acceptance.sh: BUDGET_S must be a number of seconds, not '$BUDGET_S'" >&2
  exit 2
fi
for name in ${from:+"$from"} ${chosen[@]+"${chosen[@]}"}; do
  if [[ " ${names[*]} " != *" $name "* ]]; then
    echo "gpu_acceptance.sh: no step named '$name'; the steps: ${names[*]}" >&2
    exit 2
  fi
done

if [ "$list" = 1 ]; then
  printf '%-22s %9s %7s  %s\n' step "estimate" limit command
  for line in "${PLAN[@]}"; do
    IFS='|' read -r name estimate limit command <<<"$line"
    printf '%-22s %8ss %6ss  %s\n' "$name" "$estimate" "$limit" "$command"
  done
  exit 0
fi

started=$SECONDS
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name(0))"

reached=$([ -z "$from" ] && echo 1 || echo 0)
passed=()
failed=()
skipped=()
for line in "${PLAN[@]}"; do
  IFS='|' read -r name estimate limit command <<<"$line"
  [ "$name" = "$from" ] && reached=1
  [ "$reached" = 1 ] || continue
  if [ "${#chosen[@]}" -gt 0 ] && [[ " ${chosen[*]} " != *" $name "* ]]; then continue; fi
  left=$((BUDGET_S - (SECONDS - started)))
  if [ "$left" -lt "$estimate" ]; then
    echo "=== $name: skipped: ${left} s of the ${BUDGET_S} s budget left, it needs about ${estimate} s"
    skipped+=("$name")
    continue
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name: $command"
  start=$SECONDS
  # shellcheck disable=SC2086  # the command is word-split on purpose
  timeout -k 15 "$limit" $command
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  if [ "$rc" = 0 ]; then passed+=("$name"); else failed+=("$name"); fi
done

echo "passed: ${passed[*]:-none}"
[ "${#skipped[@]}" -gt 0 ] &&
  echo "skipped (budget): ${skipped[*]}; go on with: bash studies/gpu_acceptance.sh ${skipped[*]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
[ "${#skipped[@]}" -gt 0 ] && exit 3
echo "all steps passed"

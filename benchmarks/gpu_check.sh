#!/usr/bin/env bash
# Verifies and measures the GPU path in one go, in about 7 minutes of wall time on one GPU:
#
#   bash benchmarks/gpu_check.sh
#
# Stages, each under `timeout` and given at most the time left of BUDGET seconds (default 420),
# in order of what the figures in benchmarks/README.md need most: versions and GPU; the CUDA
# tests; epochs on all 50,000 CIFAR-10 training images (WRN-16-2 teacher; WRN-16-1 AT student
# on the default path, compiled, compiled with CUDA graphs and --reference; WRN-16-1 alone; the
# 19-student cohort of the methods of 2022-2025; a 25-student cohort); the original pipeline's
# epoch on the same GPU; a profile of the step; the whole test suite. STAGES=rest skips the five
# AT and WRN-16-1-alone runs, for a machine whose budget should go to the later stages. A summary
# grows in $OUT/summary.md as stages finish; each stage's output goes to $OUT/stages.log and the
# runs' logs to $OUT/logs.tar.gz. Without a GPU the GPU stages are skipped (that is how the script
# itself is tested).
#
# Needs, in the checkout (both git-ignored): .whl/pytorch_ignite-*.whl where ignite is not
# installed, and data/cifar10-jpeg.tar.gz (train/<class>/*.jpg, test/<class>/*.jpg) for the
# timed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${BUDGET:-420}
STAGES=${STAGES:-all}  # rest: skips the five epochs of AT and WRN-16-1 alone measured before
RUNS=logs/gpu_check  # cifar.py finds teachers under logs/
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
LOG=$OUT/stages.log
: > "$SUMMARY"
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

note() { echo "$*" >> "$SUMMARY"; }

stage() {  # stage NAME SECONDS command...: runs it for at most SECONDS or the budget left
  local name=$1 limit=$2 left; shift 2
  left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    note "- $name: skipped, out of time"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "===== $name (limit ${limit}s) =====" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  case $rc in
    0) note "- $name: ok (${took}s)" ;;
    124|137) note "- $name: TIMED OUT after ${took}s" ;;
    *) note "- $name: FAILED with exit code $rc (${took}s); see stages.log" ;;
  esac
  return $rc
}

# ---------------------------------------------------------------------------------------------
# Set-up: ignite from the carried wheel, the data once as CIFAR's python release (decoding the
# JPEGs in every run would cost each run half a minute).
# Into the interpreter's own environment where it can be written: the tests start cifar.py in
# subprocesses with a PYTHONPATH of their own, which would not see a --target folder.
if ! python3 -c 'import ignite' 2>/dev/null; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl >> "$LOG" 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
fi
note "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
note ""
note '```'
nvidia-smi -L >> "$SUMMARY" 2>/dev/null
python3 -c 'import torch, torchvision, ignite, platform; print("python", platform.python_version(), "| torch",
torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(), "| torchvision",
torchvision.__version__, "| ignite", ignite.__version__, "| GPU", torch.cuda.get_device_name() if
torch.cuda.is_available() else None, "| CPUs", __import__("os").cpu_count())' >> "$SUMMARY" 2>&1
note '```'
GPU=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')

DATA=/tmp/cifar10-release
if [ -f data/cifar10-jpeg.tar.gz ] && [ ! -d $DATA/cifar-10-batches-py ]; then
  mkdir -p /tmp/cifar10-jpeg $DATA
  tar -xzf data/cifar10-jpeg.tar.gz -C /tmp/cifar10-jpeg
  python3 - /tmp/cifar10-jpeg $DATA >> "$LOG" 2>&1 <<'EOF'
import os, pickle, sys
from datasets.cifar import load_cifar
tree, out = sys.argv[1:]
os.makedirs(os.path.join(out, 'cifar-10-batches-py'))
for split, names in (('train', [f'data_batch_{i}' for i in range(1, 6)]), ('test', ['test_batch'])):
    images, labels = load_cifar(tree, 'CIFAR10', split == 'train', threads=os.cpu_count())
    for name, idx in zip(names, range(0, len(images), 10000)):
        batch = {'data': images[idx:idx + 10000].reshape(-1, 3072).numpy(), 'labels': labels[idx:idx + 10000].tolist()}
        with open(os.path.join(out, 'cifar-10-batches-py', name), 'wb') as f:
            pickle.dump(batch, f)
EOF
fi

note ""
note "## Stages"
stage "tests/test_cuda.py" 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py

if [ "$GPU" = 1 ] && [ -d $DATA/cifar-10-batches-py ]; then
  rm -rf $RUNS
  cifar=(python3 cifar.py --dataroot $DATA --nthread 8 --epoch_step '[]')
  STUDENT=(--depth 16 --width 1 --teacher_id gpu_check/teacher --beta 1e3 --alpha 0.9 --seed 1)
  stage "teacher WRN-16-2, 1 epoch" 90 "${cifar[@]}" --depth 16 --width 2 --epochs 1 --seed 1 --save $RUNS/teacher
  if [ "$STAGES" = all ]; then
    stage "AT student, default path, 3 epochs" 60 "${cifar[@]}" "${STUDENT[@]}" --epochs 3 --save $RUNS/at_default
    stage "AT student, --reference, 3 epochs" 60 "${cifar[@]}" "${STUDENT[@]}" --epochs 3 --reference --save $RUNS/at_reference
    stage "AT student, --compile on, 3 epochs" 150 "${cifar[@]}" "${STUDENT[@]}" --epochs 3 --compile on --save $RUNS/at_compiled
    stage "WRN-16-1 alone, default path, 3 epochs" 45 "${cifar[@]}" --depth 16 --width 1 --seed 1 --epochs 3 --save $RUNS/plain_default
    stage "WRN-16-1 alone, --compile on, 3 epochs" 120 "${cifar[@]}" --depth 16 --width 1 --seed 1 --epochs 3 --compile on \
      --save $RUNS/plain_compiled
  fi
  stage "19-student cohort of the methods of 2022-2025, 1 epoch" 200 "${cifar[@]}" --depth 16 --width 1 \
    --teacher_id gpu_check/teacher --epochs 1 --save $RUNS/cohort_new_methods \
    --cohort @results/crd_protocol/members_new_methods.json
  COHORT=$(python3 -m methods columns --table table1 --seeds "1 2 3 4 5" wrn_16_2:wrn_16_1 | cut -d' ' -f3-)
  stage "25-student cohort (Table 1 row), 2 epochs" 150 "${cifar[@]}" --depth 16 --width 1 --teacher_id gpu_check/teacher \
    --epochs 2 --save $RUNS/cohort25 --cohort "$COHORT"
  stage "original pipeline, AT, 2 epochs" 120 python3 benchmarks/epoch_speed.py --dataroot $DATA --mode at \
    --train_images 50000 --test_images 10000 --epochs 2 --nthread 8 --only original
  stage "profile of the AT step, eager" 45 python3 benchmarks/profile_step.py --mode at
  stage "AT student, --compile on --compile_mode reduce-overhead, 3 epochs" 150 "${cifar[@]}" "${STUDENT[@]}" --epochs 3 \
    --compile on --compile_mode reduce-overhead --save $RUNS/at_cudagraphs
  stage "profile of the AT step, compiled" 120 python3 benchmarks/profile_step.py --mode at --compile on
else
  note "- timed stages: skipped (GPU: $GPU; data/cifar10-jpeg.tar.gz present: $([ -f data/cifar10-jpeg.tar.gz ] && echo yes || echo no))"
  stage "profile of the AT step (CPU, 2 steps)" 120 python3 benchmarks/profile_step.py --mode at --steps 2 --warmup 1
fi
# The whole suite last, with what is left; on one GPU its two-process torchrun tests run on the
# CPU (they hide the GPU themselves).
XDIST=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
[ "$GPU" = 1 ] && stage "whole test suite on CUDA" 600 python3 -m pytest -q -p no:cacheprovider $XDIST tests

# ---------------------------------------------------------------------------------------------
note ""
note "## Epochs (50,000 training + 10,000 test images, batch 128; last epoch of each run)"
python3 - "$RUNS" "$LOG" >> "$SUMMARY" 2>&1 <<'EOF'
import json, os, re, sys
runs, log = sys.argv[1:]
original = re.findall(r'\| original \(PIL \+ workers, fp32\) \| ([\d.]+) \|', open(log).read())
original = float(original[-1]) if original else None
rows = []
for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
    path = os.path.join(runs, name, 'log.txt')
    if not os.path.exists(path):  # a cohort: one member stands for all (they share the epoch)
        members = sorted(os.listdir(os.path.join(runs, name)))
        path = os.path.join(runs, name, members[0], 'log.txt') if members else path
    if not os.path.exists(path):
        continue
    last = json.loads(open(path).readlines()[-1].split('json_stats: ', 1)[1])
    rows.append((name, last))
print('| run | epoch | train s | test s | train images/s | epoch vs original | peak GPU MiB | test acc % |')
print('| --- | --- | --- | --- | --- | --- | --- | --- |')
for name, r in rows:
    total = r['train_time'] + r['test_time']
    ratio = f'{original / total:.1f}x' if original else 'n/a'
    print(f"| {name} | {r['epoch']} | {r['train_time']:.2f} | {r['test_time']:.2f} | {50000 / r['train_time']:.0f} | "
          f"{ratio} | {r.get('gpu_memory_mib', float('nan')):.0f} | {r['test_acc']:.2f} |")
if original:
    print(f'\noriginal pipeline (PIL workers, fp32, .item() per batch): {original:.1f} s per epoch (train + test)')
EOF
grep -E '^\| (at|plain) \|' "$LOG" >> "$SUMMARY"
[ -d $RUNS ] && tar -czf "$OUT/logs.tar.gz" $RUNS --exclude='*.pt7' 2>/dev/null
cat "$SUMMARY"

#!/usr/bin/env bash
# WRN-16-1 student with knowledge distillation (alpha 0.9, T 4) from the WRN-16-2 teacher
# (logs/wrn16-2, made by scripts/teachers.sh). Paper: 7.41% test error on CIFAR-10.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 cifar.py --save logs/kd_16-1_from_16-2 --depth 16 --width 1 --teacher_id wrn16-2 --alpha 0.9 --temperature 4 "$@"

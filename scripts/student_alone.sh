#!/usr/bin/env bash
# WRN-16-1 trained without a teacher: the baseline the transfer students are compared with.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 cifar.py --save logs/wrn16-1 --depth 16 --width 1 "$@"

#!/usr/bin/env bash
# The teachers of the paper's CIFAR-10 experiments (Table 1): WRN-16-2, WRN-40-1, WRN-40-2.
# Usage: scripts/teachers.sh [extra cifar.py flags, e.g. --dataroot DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 cifar.py --save logs/wrn16-2 --depth 16 --width 2 "$@"
python3 cifar.py --save logs/wrn40-1 --depth 40 --width 1 "$@"
python3 cifar.py --save logs/wrn40-2 --depth 40 --width 2 "$@"

#!/usr/bin/env bash
# The paper's Table 1 (CIFAR-10 test error): three teachers, then for each student/teacher pair
# the columns student, AT, F-ActT, KD, AT+KD, each over --seed 1..5 (the paper reports medians
# of five runs). 3 teachers + 70 student runs of 200 epochs each.
#
# Usage: scripts/table1.sh [extra cifar.py flags, e.g. --dataroot DIR]
#        SEEDS="1 2" scripts/table1.sh ...          fewer seeds
#        CIFAR=echo scripts/table1.sh               print the runs' flags instead of training
# Every run lives in logs/table1/<name>; a finished run is skipped and an interrupted one resumes,
# so the script can simply be started again. Read the table with
#        python3 summarize.py logs/table1
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
CIFAR=${CIFAR:-python3 cifar.py}  # CIFAR=echo lists the runs without training

run() {  # run NAME [cifar.py flags...]
  local dir=logs/table1/$1; shift
  if [ -f "$dir/model.pt7" ]; then
    $CIFAR --save "$dir" --resume "$dir/model.pt7" "$@"
  else
    $CIFAR --save "$dir" "$@"
  fi
}

# Teachers (one each, seed 1); students find them as --teacher_id table1/teacher_wrn<d>-<w>.
for net in "16 2" "40 1" "40 2"; do
  read -r d w <<< "$net"
  run "teacher_wrn$d-$w" --depth "$d" --width "$w" --seed 1 "$@"
done

# Columns: the transfer flags of each method. F-ActT's weight and AT+KD's beta decay are this
# suite's choices (the paper gives neither); the others are the paper's.
declare -A METHOD=(
  [at]="--beta 1e3"
  [factt]="--factt_beta 1"
  [kd]="--alpha 0.9 --temperature 4"
  [at_kd]="--alpha 0.9 --beta 1e3 --beta_decay 0.2"
)

for seed in $SEEDS; do
  # The "student" column: each student architecture trained alone.
  for net in "16 1" "16 2"; do
    read -r d w <<< "$net"
    run "wrn$d-${w}_alone_seed$seed" --depth "$d" --width "$w" --seed "$seed" "$@"
  done
  # Student depth and width, teacher depth and width.
  for pair in "16 1 16 2" "16 1 40 1" "16 2 40 2"; do
    read -r d w td tw <<< "$pair"
    for method in at factt kd at_kd; do
      # shellcheck disable=SC2086  # METHOD holds several flags
      run "wrn$d-${w}_from_wrn$td-${tw}_${method}_seed$seed" --depth "$d" --width "$w" \
        --teacher_id "table1/teacher_wrn$td-$tw" --seed "$seed" ${METHOD[$method]} "$@"
    done
  done
done

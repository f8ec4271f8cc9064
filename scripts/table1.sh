#!/usr/bin/env bash
# The paper's Table 1 (CIFAR-10 test error): three teachers, then each student/teacher row as one
# cohort (cifar.py --cohort): the columns student, AT, F-ActT, KD, AT+KD, each over --seed 1..5
# (the paper reports medians of five runs), trained in lock-step on the same batches with one
# teacher forward per batch. 3 teachers + 3 cohorts of 25 students, 200 epochs each.
#
# Usage: scripts/table1.sh [extra cifar.py flags, e.g. --dataroot DIR]
#        SEEDS="1 2" scripts/table1.sh ...          fewer seeds
#        CIFAR=echo scripts/table1.sh               print the runs' flags instead of training
# Teachers live in logs/table1/teacher_wrn<d>-<w>/, each row's students in
# logs/table1/wrn<d>-<w>_from_wrn<td>-<tw>/<column>_seed<k>/. A finished run is skipped and an
# interrupted one resumes, so the script can simply be started again. Read the table with
#        python3 summarize.py logs/table1
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2 3 4 5"}
CIFAR=${CIFAR:-python3 cifar.py}  # CIFAR=echo lists the runs without training

source scripts/runs.sh

# Teachers (one each, seed 1); students find them as --teacher_id table1/teacher_wrn<d>-<w>.
for net in "16 2" "40 1" "40 2"; do
  read -r d w <<< "$net"
  single "logs/table1/teacher_wrn$d-$w" --depth "$d" --width "$w" --seed 1 "$@"
done

# Columns: each method's per-student options. F-ActT's weight and AT+KD's beta decay are this
# suite's choices (the paper gives neither); the others are the paper's. The student column
# trains on cross-entropy alone: it has the row's teacher but gives it no weight.
declare -A METHOD=(
  [student]=''
  [at]='"beta": 1000'
  [factt]='"factt_beta": 1'
  [kd]='"alpha": 0.9, "temperature": 4'
  [at_kd]='"alpha": 0.9, "beta": 1000, "beta_decay": 0.2'
)

# Student depth and width, teacher depth and width.
for pair in "16 1 16 2" "16 1 40 1" "16 2 40 2"; do
  read -r d w td tw <<< "$pair"
  cohort "logs/table1/wrn$d-${w}_from_wrn$td-$tw" "$(members student at factt kd at_kd)" --depth "$d" --width "$w" \
    --teacher_id "table1/teacher_wrn$td-$tw" "$@"
done

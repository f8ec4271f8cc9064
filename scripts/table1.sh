#!/usr/bin/env bash
# The paper's Table 1 (CIFAR-10 test error): three teachers, then each student/teacher row as one
# cohort (cifar.py --cohort): the columns student, AT, F-ActT, KD, AT+KD, each over --seed 1..5
# (the paper reports medians of five runs), trained in lock-step on the same batches with one
# teacher forward per batch. 3 teachers + 3 cohorts of 25 students, 200 epochs each.
#
# Usage: scripts/table1.sh [extra cifar.py flags, e.g. --dataroot DIR]
#        SEEDS="1 2" scripts/table1.sh ...          fewer seeds
#        CIFAR=echo scripts/table1.sh               print the runs' commands instead of training
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

# Columns: the student alone (cross-entropy; it has the row's teacher but gives it no weight), then
# AT, F-ActT, KD and AT+KD as their files declare them for Table 1 (methods/, Method.columns): the
# paper's weights; F-ActT's weight and AT+KD's beta decay are this suite's choices (the paper gives
# neither). Teacher and student in RepDistiller's names, whose WRNs are these.
ROWS=$(python3 -m methods columns --table table1 --seeds "$SEEDS" wrn_16_2:wrn_16_1 wrn_40_1:wrn_16_1 wrn_40_2:wrn_16_2)

while read -r t s members <&3; do
  IFS=_ read -r _ d w <<< "$s"
  IFS=_ read -r _ td tw <<< "$t"
  cohort "logs/table1/wrn$d-${w}_from_wrn$td-$tw" "$members" --depth "$d" --width "$w" \
    --teacher_id "table1/teacher_wrn$td-$tw" "$@"
done 3<<< "$ROWS"

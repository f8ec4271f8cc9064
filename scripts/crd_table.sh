#!/usr/bin/env bash
# The CIFAR-100 distillation benchmark of the CRD paper (Tian et al. 2020), as its code
# (RepDistiller) runs it: the 13 teacher/student pairs of its tables, each pair's students as one
# cohort (cifar.py --cohort) with every column of its table (student, KD, FitNet, AT, SP, CC,
# VID, RKD, PKT, AB, FT, FSP, NST, CRD, CRD+KD) plus AT+KD, DKD, KD with logit standardisation,
# OFD, ReviewKD, DIST, CTKD (+KD, +DKD), WTTM, NKD, SDD (-DKD, -KD), CAT-KD, MLKD (+LS) and KD+DOT, over $SEEDS,
# trained in lock-step on the same batches with one teacher forward per batch. OFD runs where
# the pair's groups have the same spatial sizes, FSP and KDSVD where they have equal widths: the
# other pairs would be refused. RepDistiller's protocol: 240 epochs, batch 64, SGD (momentum 0.9) at lr 0.05 (0.01 for
# MobileNetV2 and the ShuffleNets) divided by 10 at epochs 150, 180 and 210, weight decay 5e-4,
# random crops of zero-padded images, CIFAR-100's own mean and std.
#
# Usage: scripts/crd_table.sh [extra cifar.py flags, e.g. --dataroot DIR]
#        TEACHERS=DIR scripts/crd_table.sh ...   RepDistiller's published teachers, read as
#                                                DIR/<arch>_vanilla/ckpt_epoch_240.pth (the layout
#                                                of its scripts/fetch_pretrained_teachers.sh);
#                                                without TEACHERS the six teachers are trained
#                                                here first, with the same protocol, seed 1
#        SEEDS="1 2 3" scripts/crd_table.sh ...  seeds of every column (default: 1)
#        CIFAR=echo scripts/crd_table.sh         print the runs' commands instead of training
# Teachers trained here live in logs/crd/teacher_<arch>/, each pair's students in
# logs/crd/<student>_from_<teacher>/<column>_seed<k>/. A finished run is skipped and an
# interrupted one resumed, so the script can simply be started again. Read the table with
#        python3 summarize.py logs/crd
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1}
TEACHERS=${TEACHERS:-}
CIFAR=${CIFAR:-python3 cifar.py}  # CIFAR=echo lists the runs without training

# Teacher and student of each pair, in the order of RepDistiller's two tables (same
# architecture type, then different types).
PAIRS=(
  "wrn_40_2 wrn_16_2" "wrn_40_2 wrn_40_1" "resnet56 resnet20" "resnet110 resnet20"
  "resnet110 resnet32" "resnet32x4 resnet8x4" "vgg13 vgg8"
  "vgg13 MobileNetV2" "ResNet50 MobileNetV2" "ResNet50 vgg8" "resnet32x4 ShuffleV1"
  "resnet32x4 ShuffleV2" "wrn_40_2 ShuffleV1"
)
PROTOCOL=(--dataset CIFAR100 --epochs 240 --batch_size 64 --epoch_step '[150,180,210]'
          --lr_decay_ratio 0.1 --weight_decay 5e-4 --randomcrop_pad 4 --crop_padding zero
          --normalization cifar100 --momentum_at_decay keep)

learning_rate() {  # RepDistiller lowers it for its two smallest families
  case $1 in
    MobileNetV2 | ShuffleV1 | ShuffleV2) echo 0.01 ;;
    *) echo 0.05 ;;
  esac
}

published() {  # where RepDistiller's teacher of this architecture lies
  echo "$TEACHERS/$1_vanilla/ckpt_epoch_240.pth"
}

source scripts/runs.sh

# Columns: the student alone (cross-entropy; it has the pair's teacher but gives it no weight), then
# every method of both tables with RepDistiller's weights (its -r 1 -a 0 -b B beside the
# cross-entropy, KD 0.9 * KD(T = 4) + 0.1 * CE; AT+KD and CRD+KD both), and DKD, OFD and ReviewKD with
# mdistiller's, each with the pair's own settings where its reference has them (DKD's beta, FT's
# init-stage learning rate, ReviewKD's weight) and only on the pairs it can compare (FSP and KDSVD
# need groups of equal widths, OFD of equal sizes). Each method's file declares its columns
# (methods/, Method.columns); `python3 -m methods columns` lists every pair's cohort.
ROWS=$(python3 -m methods columns --seeds "$SEEDS" "${PAIRS[@]/ /:}")

teachers=$(for pair in "${PAIRS[@]}"; do echo "${pair%% *}"; done | awk '!seen[$0]++')
if [ -n "$TEACHERS" ]; then
  if [ "$CIFAR" != echo ]; then  # stop before the first row rather than at the first missing file
    for t in $teachers; do
      [ -f "$(published "$t")" ] || { echo "crd_table.sh: $(published "$t") does not exist; fetch RepDistiller's teachers into TEACHERS=$TEACHERS or leave TEACHERS unset to train them here" >&2; exit 2; }
    done
  fi
else
  for t in $teachers; do
    single "logs/crd/teacher_$t" --arch "$t" --lr "$(learning_rate "$t")" --seed 1 "${PROTOCOL[@]}" "$@"
  done
fi

while read -r t s members <&3; do
  if [ -n "$TEACHERS" ]; then
    from=(--teacher_params "$(published "$t")" --teacher_arch "$t")
  else
    from=(--teacher_id "crd/teacher_$t")
  fi
  cohort "logs/crd/${s}_from_$t" "$members" --arch "$s" "${from[@]}" --lr "$(learning_rate "$s")" "${PROTOCOL[@]}" "$@"
done 3<<< "$ROWS"

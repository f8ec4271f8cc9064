#!/usr/bin/env bash
# The CIFAR-100 distillation benchmark of the CRD paper (Tian et al. 2020), as its code
# (RepDistiller) runs it: the 13 teacher/student pairs of its tables, each pair's students as one
# cohort (cifar.py --cohort) with every column of its table (student, KD, FitNet, AT, SP, CC,
# VID, RKD, PKT, AB, FT, FSP, NST, CRD, CRD+KD) plus AT+KD, DKD, OFD and ReviewKD, over $SEEDS,
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
#        CIFAR=echo scripts/crd_table.sh         print the runs' flags instead of training
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
          --normalization cifar100)

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

# Columns: each method's per-student options, as RepDistiller weighs them (its -r, -a, -b):
# KD 0.9 * KD(T = 4) + 0.1 * CE, AT CE + 1000 * AT, AT+KD both. The student column trains on
# cross-entropy alone: it has the pair's teacher but gives it no weight.
# The other methods add their term to CE (RepDistiller's -r 1 -a 0 -b B, run_cifar_distill.sh):
# FitNet 100 (through RepDistiller's ConvReg regressor), SP 3000, CC 0.02, RKD 1, PKT 30000, NST 50, VID 1, CRD 0.8; CRD+KD adds KD at
# weight 1 (-a 1). AB, FT and FSP first train for 30 init epochs (RepDistiller's --init_epochs):
# AB and FSP only there, their losses summed unweighted (beta 1; RepDistiller's -b weighs a
# main-stage term its loop sets to 0), FT's paraphraser there (at lr 0.01 for ResNet and WRN
# students, as RepDistiller; at --lr for the others) and FT at 200 in the main stage. RepDistiller has no weight for KDSVD; 1 is
# mdistiller's (CE 1, KDSVD 1 on this benchmark). DKD, OFD and ReviewKD are mdistiller's: CE +
# DKD (alpha 1, T 4) warmed up over 20 epochs with its beta per pair (dkd_nckd below); OFD 1e-3;
# ReviewKD 5 for resnet32x4 -> resnet8x4 (its one CIFAR-100 file), 1 (its default) elsewhere,
# warmed up over 20 epochs.
declare -A METHOD=(
  [student]=''
  [kd]='"alpha": 0.9, "temperature": 4'
  [at]='"beta": 1000'
  [at_kd]='"alpha": 0.9, "beta": 1000, "temperature": 4'
  [sp]='"sp_beta": 3000'
  [cc]='"cc_beta": 0.02'
  [rkd]='"rkd_beta": 1'
  [pkt]='"pkt_beta": 30000'
  [nst]='"nst_beta": 50'
  [fsp]='"fsp_beta": 1'
  [kdsvd]='"kdsvd_beta": 1'
  [vid]='"vid_beta": 1'
  [fitnet]='"fitnet_beta": 100, "fitnet_regressor": "convreg"'
  [ab]='"ab_beta": 1'
  [crd]='"crd_beta": 0.8'
  [crd_kd]='"crd_beta": 0.8, "kd_beta": 1'
  [ofd]='"ofd_beta": 0.001'
)

dkd_nckd() {  # DKD's beta, from mdistiller's configs/cifar100/dkd/ (8, its default, where it has none)
  case $1 in
    "resnet56 resnet20" | "resnet110 resnet32") echo 2 ;;
    "wrn_40_2 wrn_16_2" | "wrn_40_2 wrn_40_1" | "vgg13 vgg8" | "vgg13 MobileNetV2") echo 6 ;;
    *) echo 8 ;;
  esac
}

reviewkd_beta() {  # mdistiller's configs/cifar100/reviewkd.yaml (resnet32x4 -> resnet8x4), else its default
  case $1 in
    "resnet32x4 resnet8x4") echo 5 ;;
    *) echo 1 ;;
  esac
}

columns() {  # FSP and KDSVD compare the groups' channels one to one: pairs of equal widths only;
             # OFD needs groups of the same spatial sizes
  echo student kd fitnet at at_kd sp cc rkd pkt nst vid dkd ab ft crd crd_kd reviewkd
  case $1 in
    "wrn_40_2 wrn_16_2" | "wrn_40_2 wrn_40_1" | "resnet56 resnet20" | "resnet110 resnet20" | \
    "resnet110 resnet32" | "resnet32x4 resnet8x4" | "vgg13 vgg8") echo ofd ;;
  esac
  case $1 in
    "wrn_40_2 wrn_16_2" | "resnet56 resnet20" | "resnet110 resnet20" | "resnet110 resnet32" | \
    "resnet32x4 resnet8x4" | "vgg13 vgg8") echo fsp kdsvd ;;
  esac
}

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

for pair in "${PAIRS[@]}"; do
  read -r t s <<< "$pair"
  if [ -n "$TEACHERS" ]; then
    from=(--teacher_params "$(published "$t")" --teacher_arch "$t")
  else
    from=(--teacher_id "crd/teacher_$t")
  fi
  METHOD[dkd]="\"dkd_beta\": 1, \"dkd_nckd\": $(dkd_nckd "$pair"), \"temperature\": 4"
  case $s in
    resnet* | wrn_*) METHOD[ft]='"ft_beta": 200, "init_lr": 0.01' ;;
    *) METHOD[ft]='"ft_beta": 200' ;;
  esac
  METHOD[reviewkd]="\"reviewkd_beta\": $(reviewkd_beta "$pair")"
  # shellcheck disable=SC2046  # the column names are words
  cohort "logs/crd/${s}_from_$t" "$(members $(columns "$pair"))" --arch "$s" "${from[@]}" --lr "$(learning_rate "$s")" "${PROTOCOL[@]}" "$@"
done

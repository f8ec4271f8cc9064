#!/usr/bin/env bash
# ImageNet: ResNet-18 student with attention transfer on the outputs of its four groups from a
# trained ResNet-34 teacher (paper section 4.2: top-1/top-5 error 30.4/10.8 -> 29.3/10.0).
# Usage: scripts/imagenet.sh IMAGENET_DIR TEACHER_WEIGHTS [extra imagenet.py flags]
#   IMAGENET_DIR holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; TEACHER_WEIGHTS is a
#   torchvision resnet34 state dict (e.g. resnet34-b627a593.pth) or the BN-folded export.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 IMAGENET_DIR TEACHER_WEIGHTS [imagenet.py flags]" >&2
    exit 2
fi
imagenet=$(realpath "$1") teacher=$(realpath "$2")
shift 2
cd "$(dirname "$0")/.."
python3 imagenet.py --imagenetpath "$imagenet" --teacher_params "$teacher" --save logs/at_resnet18_from_resnet34 \
    --depth 18 --width 1 --beta 1e3 "$@"

"""Test accuracy of a trained run evaluated in fp32 and under bf16 autocast, on the same images.

    python3 benchmarks/eval_precision.py logs/wrn16-2 [--dataroot DIR]

Training on the fast path uses bf16 autocast; evaluation runs in fp32 so that a reported test
accuracy does not depend on the hardware. This measures what evaluating in bf16 instead would
change: both accuracies, and how many test images get a different prediction. On CPUs without
bf16 units the bf16 pass is emulated (slow, same rounding).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from datasets.cifar import NUM_CLASSES, Loader, load_cifar  # noqa: E402
from engine.checkpoint import load_checkpoint, network_params, read_log  # noqa: E402
from resnet import resnet  # noqa: E402


def predictions(f, params, loader, bf16):
    out = []
    with torch.no_grad(), torch.autocast('cpu' if not torch.cuda.is_available() else 'cuda', torch.bfloat16,
                                         enabled=bf16):
        for x, _, _, _ in loader:
            out.append(f(x.contiguous(memory_format=torch.channels_last), params, False)[0].argmax(1))
    return torch.cat(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run', help='a cifar.py run directory (log.txt, model.pt7)')
    p.add_argument('--dataroot', default=None, help="the test data (default: the run's --dataroot)")
    args = p.parse_args()
    options = read_log(args.run)[-1]
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    num_classes = NUM_CLASSES[options['dataset']]
    f, params = resnet(options['depth'], options['width'], num_classes)
    state = network_params(load_checkpoint(os.path.join(args.run, 'model.pt7'))['params'])
    params = {k: state[k].to(device).contiguous(memory_format=torch.channels_last) if state[k].dim() == 4
              else state[k].to(device) for k in params}
    images, labels = load_cifar(args.dataroot or options['dataroot'], options['dataset'], False)
    loader = Loader(images.to(device), labels.to(device), 256, train=False)
    fp32, bf16 = predictions(f, params, loader, False), predictions(f, params, loader, True)
    labels = labels.to(device)
    acc32, acc16 = [100 * (p == labels).float().mean().item() for p in (fp32, bf16)]
    changed = (fp32 != bf16).sum().item()
    print(f'{args.run}: WRN-{options["depth"]}-{options["width"]:g}, {len(labels)} test images, {device}')
    print('| evaluation | test acc % |\n| --- | --- |')
    print(f'| fp32 | {acc32:.2f} |\n| bf16 autocast | {acc16:.2f} |')
    print(f'difference {acc16 - acc32:+.2f} points; {changed} predictions ({100 * changed / len(labels):.2f}%) differ')


if __name__ == '__main__':
    main()

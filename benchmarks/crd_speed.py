"""Times a training epoch of the CRD benchmark's headline pair, resnet8x4 from resnet32x4 with
AT, on the reference path (--reference: fp32, NCHW, plain SGD) against the default fast path.

    python3 benchmarks/crd_speed.py --dataroot DIR [--train_images 2000] [--test_images 1000]

Both paths train through cifar.py's options and the shared loop, in one run, on the same images
(a seeded random subset of a CIFAR-10 folder, with a 10-class head: the arithmetic per image is
CIFAR-100's but for the last layer), with RepDistiller's protocol: batch 64, zero-padded crops,
CIFAR-100 normalisation, AT weight 1000. The teacher has random weights (a trained one costs the
same). The last of --epochs epochs is reported: the first pays for one-off set-up (and, with
--compile on, for compilation). Mode `plain` times resnet8x4 alone, for the teacher's share.
"""
import argparse
import json
import os
import platform
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from epoch_speed import random_subset  # noqa: E402

import cifar  # noqa: E402
from datasets.cifar import Loader  # noqa: E402
from engine.devices import cpu_has_bf16, uses_channels_last  # noqa: E402
from engine.members import build_members  # noqa: E402
from engine.training import train  # noqa: E402
from models import zoo  # noqa: E402

PROTOCOL = ['--batch_size', '64', '--crop_padding', 'zero', '--normalization', 'cifar100', '--epoch_step', '[]',
            '--lr', '0.05']


def teacher():
    torch.manual_seed(0)
    f, params = zoo.network('resnet32x4', 10)
    return (lambda x, p, prefix: f(x, p, False, prefix)), {k: v.requires_grad_(False) for k, v in params.items()}


def last_epoch(args, mode, data, device, reference):
    """(train seconds, test seconds) of the last epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = ['--save', os.path.join(tmp, 'run'), '--arch', 'resnet8x4', '--seed', '0', '--data_seed', '0',
                 '--epochs', str(args.epochs), '--compile', args.compile, *PROTOCOL]
        if mode == 'at':
            flags += ['--teacher_params', 'random', '--teacher_arch', 'resnet32x4', '--beta', '1e3']
        opt = cifar.parse_args(flags + (['--reference'] if reference else []))
        layout = dict(channels_last=uses_channels_last(opt), normalization=opt.normalization)
        train_loader = Loader(*[t.to(device) for t in data['train']], opt.batch_size, train=True, seed=0,
                              padding=opt.crop_padding, **layout)
        test_loader = Loader(*[t.to(device) for t in data['test']], opt.batch_size, train=False, **layout)
        members = build_members([opt], lambda: zoo.network('resnet8x4', 10), teacher() if mode == 'at' else None,
                                image_size=32, device=device, channels_last=layout['channels_last'])
        train(opt, members, train_loader, test_loader, num_classes=10, device=device)
        with open(os.path.join(tmp, 'run', 'log.txt')) as log:
            last = json.loads(log.readlines()[-1][len('json_stats: '):])
        return last['train_time'], last['test_time']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--modes', choices=['at', 'plain'], nargs='+', default=['at'])
    p.add_argument('--train_images', type=int, default=2000)
    p.add_argument('--test_images', type=int, default=1000)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--compile', choices=['on', 'off'], default='off',
                   help='compile the fast path, as a run of 10+ epochs does (the first epoch pays for it)')
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = random_subset(args.dataroot, args.train_images, args.test_images, 4)
    n_train, n_test = len(data['train'][0]), len(data['test'][0])
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'{n_train} train + {n_test} test images, torch {torch.__version__}, {machine}, compile {args.compile}')
    rows = []
    for mode in args.modes:
        reference = last_epoch(args, mode, data, device, reference=True)
        fast = last_epoch(args, mode, data, device, reference=False)
        rows.append((mode, reference, fast))
    print('\n| run | path | train s | test s | train img/s | epoch vs reference |\n'
          '| --- | --- | --- | --- | --- | --- |')
    for mode, reference, fast in rows:
        label = 'resnet8x4 <- resnet32x4, AT' if mode == 'at' else 'resnet8x4 alone'
        for path, (train_s, test_s) in (('--reference (fp32, NCHW)', reference), ('default', fast)):
            print(f'| {label} | {path} | {train_s:.1f} | {test_s:.1f} | {n_train / train_s:.0f} | '
                  f'{sum(reference) / (train_s + test_s):.2f}x |')


if __name__ == '__main__':
    main()

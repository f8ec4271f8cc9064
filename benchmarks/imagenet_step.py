"""Times ImageNet training steps, reference path against fast path, and the JPEG input pipeline.

    python3 benchmarks/imagenet_step.py [--batch_size 16] [--steps 3] [--only at alone decode]

Steps: a ResNet-18 student with a ResNet-34 teacher (AT on four groups + KD), and the ResNet-18
alone, on random 224x224 data, through the real training loop (`training.train`, meters and
all), once with `--reference` (fp32, NCHW, plain SGD) and once on the default fast path (bf16
autocast where the hardware has bf16 units, channels_last, fused SGD). Each path trains two
epochs of --steps steps; the second is reported (the first pays for one-off set-up).
Decode: one process decoding, cropping and resizing ImageNet-sized JPEGs (500x375) as a
DataLoader worker does; the input pipeline delivers about this rate times --nthread.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import imagenet  # noqa: E402
from datasets.imagenet import ImageFiles  # noqa: E402
from engine.devices import cpu_has_bf16  # noqa: E402
from engine.members import build_members  # noqa: E402
from engine.training import train  # noqa: E402
from resnet import IMAGENET_BLOCKS, define_student, fold_batch_norm, teacher_forward  # noqa: E402


class RandomBatches:
    """`steps` batches of random normalised images, made once, in the loader interface train uses."""

    def __init__(self, steps, batch_size, num_classes, device, channels_last):
        x = torch.randn(batch_size, 3, 224, 224, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.batch = (x, torch.randint(num_classes, (batch_size,), device=device), 1.0)
        self.steps, self.batch_size, self.skip = steps, batch_size, 0

    def set_epoch(self, epoch, skip=0):
        self.skip = skip

    def __len__(self):
        return self.steps

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter([self.batch] * (self.steps - skip))


def networks(mode, num_classes):
    """ResNet-18 student, and for 'at' a BN-folded ResNet-34 teacher: (f_s, params_s, teacher).
    A random teacher costs the same arithmetic as a trained one."""
    torch.manual_seed(0)
    f_s, p_s = define_student(18, 1, num_classes)
    if mode == 'alone':
        return f_s, p_s, None
    p_t = fold_batch_norm(define_student(34, 1, num_classes)[1])
    return f_s, p_s, (teacher_forward(IMAGENET_BLOCKS[34]), {k: v.requires_grad_(False) for k, v in p_t.items()})


def images_per_second(args, mode, reference, device):
    with tempfile.TemporaryDirectory() as tmp:
        flags = ['--imagenetpath', tmp, '--save', os.path.join(tmp, 'run'), '--epochs', '2', '--seed', '0',
                 '--beta', '1e3', '--alpha', '0.9', '--compile', args.compile] + (['--reference'] if reference else [])
        opt = imagenet.parse_args(flags)
        f_s, p_s, teacher = networks(mode, args.num_classes)
        members = build_members([opt], lambda: (f_s, p_s), teacher, image_size=224, device=device,
                                channels_last=not reference)
        batches = RandomBatches(args.steps, args.batch_size, args.num_classes, device, not reference)
        train(opt, members, batches, RandomBatches(1, args.batch_size, args.num_classes, device, not reference),
              num_classes=args.num_classes, device=device, topk=5)
        with open(os.path.join(tmp, 'run', 'log.txt')) as log:
            last = json.loads(log.readlines()[-1][len('json_stats: '):])
    return args.steps * args.batch_size / last['train_time']


def decode_rate(n=64):
    """Images per second one worker process turns from JPEG files into training crops."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(8):  # smooth noise compresses like a photograph, not like white noise
            small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
            path = os.path.join(tmp, f'{i}.jpg')
            Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(path, quality=90)
            paths.append(path)
        rates = {}
        for split, train_mode in (('train', True), ('val', False)):
            files = ImageFiles(paths * (n // len(paths)), [0] * n, train_mode)
            files[(0, 0)]
            start = time.perf_counter()
            for i in range(n):
                files[(i, i)]
            rates[split] = n / (time.perf_counter() - start)
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--steps', type=int, default=3, help='steps per timed epoch')
    p.add_argument('--num_classes', type=int, default=1000)
    p.add_argument('--compile', choices=['on', 'off'], default='off',
                   help='compile the fast path, as runs of 10+ epochs do (minutes on a CPU)')
    p.add_argument('--only', nargs='*', choices=['at', 'alone', 'decode'], default=['at', 'alone', 'decode'])
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'batch {args.batch_size} at 224x224, torch {torch.__version__}, {machine}')
    rows = []
    for mode in [m for m in ('at', 'alone') if m in args.only]:
        reference = images_per_second(args, mode, True, device)
        fast = images_per_second(args, mode, False, device)
        label = {'at': 'ResNet-18 <- ResNet-34, AT + KD', 'alone': 'ResNet-18 alone'}[mode]
        rows.append(f'| {label} | {reference:.1f} | {fast:.1f} | {fast / reference:.2f}x |')
    if rows:
        print('\n| training step | reference img/s | fast img/s | fast / reference |\n| --- | --- | --- | --- |')
        print('\n'.join(rows))
    if 'decode' in args.only:
        rates = decode_rate()
        print(f'\none worker decoding 500x375 JPEGs: {rates["train"]:.0f} img/s (train crops), '
              f'{rates["val"]:.0f} img/s (val crops)')


if __name__ == '__main__':
    main()

"""Per-epoch cost of each transfer method, relative to plain AT measured in the same run.

    python3 benchmarks/transfer_cost.py --dataroot <CIFAR-10 image tree or python release>

WRN-16-1 student, WRN-16-2 teacher (random weights cost the same arithmetic as trained ones),
batch 128, the default fast path (bf16 autocast where the hardware is fast at it, channels_last,
fused SGD) without torch.compile, which the gradient-based methods cannot use; so every method
runs the same kind of step. Each method trains two epochs on a random subset; the second epoch
(training + test) is timed. The weights are the ones scripts/table1.sh uses; they do not change
the cost.
"""
import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from epoch_speed import last_epoch, random_subset  # noqa: E402
from devices import cpu_has_bf16  # noqa: E402

METHODS = [
    ('student alone', None),
    ('AT', ['--beta', '1e3']),
    ('AT, paper form, p = 4', ['--beta', '0.2', '--at_form', 'paper', '--at_p', '4']),
    ('KD', ['--alpha', '0.9']),
    ('AT+KD', ['--alpha', '0.9', '--beta', '1e3', '--beta_decay', '0.2']),
    ('F-ActT', ['--factt_beta', '1']),
    ('FitNets hint', ['--fitnet_beta', '1']),
    ('cosine', ['--cos_beta', '1']),
    ('auxiliary heads', ['--aux_weight', '0.3']),
    ('gradient-based AT', ['--grad_beta', '1']),
    ('flip symmetry', ['--sym_beta', '1']),
]


def epoch_seconds(flags, data, device, epochs):
    """(train, test) seconds of the last epoch; flags None: the student alone."""
    common = ['--epochs', str(epochs), '--compile', 'off']
    if flags is None:
        last = last_epoch(common, 'plain', data, device)
    else:
        last = last_epoch(common + ['--teacher_id', 'random'] + flags, 'at', data, device)
    return last['train_time'], last['test_time']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--train_images', type=int, default=5000)
    p.add_argument('--test_images', type=int, default=1000)
    p.add_argument('--epochs', type=int, default=2)
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = random_subset(args.dataroot, args.train_images, args.test_images, 4)
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'{len(data["train"][0])} train + {len(data["test"][0])} test images, torch {torch.__version__}, {machine}')
    times = {}
    for name, flags in METHODS:
        times[name] = epoch_seconds(flags, data, device, args.epochs)
    at = sum(times['AT'])
    print('\n| method | flags | train s | test s | epoch vs AT |\n| --- | --- | --- | --- | --- |')
    for name, flags in METHODS:
        train_s, test_s = times[name]
        shown = ' '.join(flags) if flags else '(no teacher)'
        print(f'| {name} | `{shown}` | {train_s:.1f} | {test_s:.1f} | {(train_s + test_s) / at:.2f}x |')


if __name__ == '__main__':
    main()

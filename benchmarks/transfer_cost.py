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
import json
import os
import platform
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar  # noqa: E402
from data import Loader, load_cifar  # noqa: E402
from epoch_speed import networks, to_device  # noqa: E402
from training import join_networks, train, cpu_has_bf16  # noqa: E402

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
    with tempfile.TemporaryDirectory() as tmp:
        teacher = flags is not None
        opt = cifar.parse_args(['--save', os.path.join(tmp, 'run'), '--epochs', str(epochs), '--seed', '0',
                                '--compile', 'off'] + (['--teacher_id', 'random'] + flags if teacher else []))
        f_s, p_s, t = networks('at' if teacher else 'plain')
        transfer, params = join_networks(opt, f_s, p_s, t)
        train_loader = Loader(*[x.to(device) for x in data['train']], 128, train=True, seed=0)
        test_loader = Loader(*[x.to(device) for x in data['test']], 128, train=False)
        train(opt, transfer, to_device(params, device), train_loader, test_loader, n_parameters=0,
              num_classes=10, device=device)
        with open(os.path.join(tmp, 'run', 'log.txt')) as log:
            last = json.loads(log.readlines()[-1][len('json_stats: '):])
    return last['train_time'], last['test_time']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--train_images', type=int, default=5000)
    p.add_argument('--test_images', type=int, default=1000)
    p.add_argument('--epochs', type=int, default=2)
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rng = torch.Generator().manual_seed(0)
    data = {}
    for split, n in (('train', args.train_images), ('test', args.test_images)):
        images, labels = load_cifar(args.dataroot, 'CIFAR10', split == 'train', 4)
        keep = torch.randperm(len(images), generator=rng)[:n]
        data[split] = (images[keep], labels[keep])
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

"""Throughput of cohorts: students trained in lock-step against one student alone.

    python3 benchmarks/cohort_speed.py --dataroot DIR [--sizes 1 5 25] [--train_images 10000]
    python3 benchmarks/cohort_speed.py --dataroot DIR --row [--train_images 1000]

In one run, on the same images, trains for --epochs epochs (the last is timed) WRN-16-1 students
of a WRN-16-2 teacher (random weights: the arithmetic is a trained teacher's) through the real
loop: size 1 is a single AT run (Table 1's AT column), size 5 an AT cohort over seeds 1..5, size
25 a Table 1 row (its five columns over seeds 1..5, as scripts/table1.sh trains them). Throughput
ratio = students x single run's epoch / cohort's epoch: how many single runs' worth of training
one cohort epoch does in the time of one.

--row: the CRD benchmark's resnet8x4 <- resnet32x4 row (100 classes, random weights), one
member per column of scripts/crd_table.sh (every method, seed 1), as one cohort against the same
members trained one by one. Members with an init stage run one init epoch first (--init_epochs
1); the last main-stage epoch is timed in both. Throughput = the one-by-one runs' summed epochs /
the cohort's epoch.
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
from epoch_speed import networks, random_subset  # noqa: E402

import cifar  # noqa: E402
import methods  # noqa: E402
from datasets.cifar import Loader  # noqa: E402
from engine.cohort import member_runs  # noqa: E402
from engine.devices import cpu_has_bf16, uses_channels_last  # noqa: E402
from engine.members import build_members  # noqa: E402
from engine.training import train  # noqa: E402
from models import zoo  # noqa: E402
from resnet import resnet  # noqa: E402


def table1_row(seeds):
    """The members of a Table 1 row (WRN-16-1 from WRN-16-2) over `seeds`, column by column."""
    return methods.cohort('table1', 'wrn_16_2', 'wrn_16_1', seeds)


def crd_row(n_train):
    """One member per column of the CRD benchmark's resnet8x4 <- resnet32x4 row, fitted to the
    training set; those with an init stage train one init epoch."""
    row = []
    for member in methods.cohort('crd', 'resnet32x4', 'resnet8x4', [1]):
        staged = any(member.get(m.weight) for m in methods.with_init_stage())
        row.append(methods.for_training_set({**member, **({'init_epochs': 1} if staged else {})}, n_train))
    return row


def calibrate_batch_norms(f, params, images, steps=30):
    """Running statistics for a random network's batch norms, as training would leave them: at
    their initial mean 0 and variance 1 a deep residual network's activations grow block by
    block in inference mode, and the feature methods (FitNet, VID, ...) of a teacher that large
    diverge at once, which a trained teacher's would not."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            batch = images[torch.randint(len(images), (64,), generator=generator)]
            f((batch.float() / 255 - 0.5) / 0.25, params, True)


def row_epoch(cohort, args, data, device):
    """(train seconds, test seconds) of the last main-stage epoch of a cohort of ROW members."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = ['--save', os.path.join(tmp, 'row'), '--teacher_id', 'random', '--epochs', str(args.epochs),
                 '--epoch_step', '[]', '--compile', args.compile, '--data_seed', '1', '--dataset', 'CIFAR100',
                 '--arch', 'resnet8x4', '--batch_size', '64', '--lr', '0.05', '--cohort', json.dumps(cohort)]
        opt = cifar.parse_args(flags)
        runs = member_runs(opt, cifar.CIFAR_RULES, 'teacher_id')
        for run in runs:
            run.data_seed = opt.data_seed
        torch.manual_seed(0)
        f_t, p_t = zoo.network('resnet32x4', 100)
        calibrate_batch_norms(f_t, p_t, data['train'][0])
        teacher = (cifar.teacher_function(f_t), {k: v.requires_grad_(False) for k, v in p_t.items()})
        layout = dict(channels_last=uses_channels_last(opt))
        train_loader = Loader(*[t.to(device) for t in data['train']], 64, train=True, seed=1, **layout)
        test_loader = Loader(*[t.to(device) for t in data['test']], 64, train=False, **layout)
        built = build_members(runs, lambda: zoo.network('resnet8x4', 100), teacher, image_size=32, device=device,
                              train_labels=train_loader.labels, **layout)
        train(opt, built, train_loader, test_loader, num_classes=100, device=device,
              n_images=(len(data['train'][0]), len(data['test'][0])))
        with open(os.path.join(runs[0].save, 'log.txt')) as log:
            last = json.loads(log.readlines()[-1][len('json_stats: '):])
        return last['train_time'], last['test_time']


def row(args, data, device):
    cohort = crd_row(len(data['train'][0]))
    together = row_epoch(cohort, args, data, device)
    alone = {m['name']: row_epoch([m], args, data, device) for m in cohort}
    print('\n| method | alone: epoch s (train + test) |')
    print('| --- | --- |')
    for name, (train_s, test_s) in alone.items():
        print(f'| {name} | {train_s + test_s:.1f} |')
    total = sum(sum(t) for t in alone.values())
    print(f'| **{len(cohort)} one by one** | {total:.1f} |')
    print(f'| **one cohort** | {sum(together):.1f} ({together[0]:.1f} + {together[1]:.1f}) |')
    print(f'\nthroughput of the cohort: {total / sum(together):.2f}x the members trained one by one')


def members(size):
    """Size 1: Table 1's AT column, seed 1; 5: that column over seeds 1..5; 25: the whole row."""
    row = table1_row(range(1, 6))
    at = [m for m in row if m['name'].startswith('at_seed')]
    cohorts = {1: at[:1], 5: at, len(row): row}
    assert size in cohorts, f'sizes are 1, 5 (AT over five seeds) or {len(row)} (a Table 1 row)'
    return cohorts[size]


def last_epoch(size, args, data, device):
    """(train seconds, test seconds) of the last epoch of a cohort of `size` students."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = ['--save', os.path.join(tmp, 'run'), '--teacher_id', 'random', '--epochs', str(args.epochs),
                 '--epoch_step', '[]', '--compile', args.compile, '--data_seed', '1']
        cohort = members(size)
        if size == 1:  # a single run with the member's options
            flags += [f for k, v in cohort[0].items() if k != 'name' for f in (f'--{k}', str(v))]
        else:
            flags += ['--cohort', json.dumps(cohort)]
        opt = cifar.parse_args(flags)
        runs = member_runs(opt, cifar.CIFAR_RULES, 'teacher_id')
        for run in runs:
            run.data_seed = opt.data_seed
        teacher = networks('at')[2]
        layout = dict(channels_last=uses_channels_last(opt))
        train_loader = Loader(*[t.to(device) for t in data['train']], 128, train=True, seed=1, **layout)
        test_loader = Loader(*[t.to(device) for t in data['test']], 128, train=False, **layout)
        built = build_members(runs, lambda: resnet(16, 1, 10), teacher, image_size=32, device=device, **layout)
        train(opt, built, train_loader, test_loader, num_classes=10, device=device)
        with open(os.path.join(runs[0].save, 'log.txt')) as log:
            last = json.loads(log.readlines()[-1][len('json_stats: '):])
        return last['train_time'], last['test_time']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--sizes', type=int, nargs='+', default=[1, 5, 25])
    p.add_argument('--train_images', type=int, default=10000)
    p.add_argument('--test_images', type=int, default=2000)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--compile', choices=['on', 'off'], default='off')
    p.add_argument('--row', action='store_true', help='the resnet8x4 <- resnet32x4 row of every method instead')
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = random_subset(args.dataroot, args.train_images, args.test_images, 4)
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'{len(data["train"][0])} train + {len(data["test"][0])} test images, torch {torch.__version__}, {machine}, '
          f'compile {args.compile}')
    if args.row:
        return row(args, data, device)
    results = {size: last_epoch(size, args, data, device) for size in args.sizes}
    single = results.get(1)
    print('\n| students | epoch: train s | epoch: test s | train s per student | throughput vs single runs |')
    print('| --- | --- | --- | --- | --- |')
    for size, (train_s, test_s) in results.items():
        ratio = f'{size * sum(single) / (train_s + test_s):.2f}x' if single else 'n/a'
        print(f'| {size} | {train_s:.1f} | {test_s:.1f} | {train_s / size:.1f} | {ratio} |')


if __name__ == '__main__':
    main()

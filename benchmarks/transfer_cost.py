"""Per-epoch cost of each transfer method, relative to plain AT measured in the same run.

    python3 benchmarks/transfer_cost.py --dataroot <CIFAR-10 image tree or python release>

WRN-16-1 student, WRN-16-2 teacher (random weights cost the same arithmetic as trained ones),
batch 128, the default fast path (bf16 autocast where the hardware is fast at it, channels_last,
fused SGD) without torch.compile, which the gradient-based methods cannot use; so every method
runs the same kind of step. Each method trains two epochs on a random subset; the second epoch
(training + test) is timed. The rows are each method's examples (methods/, Method.examples: its
usual settings, the weights scripts/table1.sh and scripts/crd_table.sh use), in the methods'
order; weights do not change the cost. A method that cannot compare the WRN-16-1 with its WRN-16-2
teacher (FSP and KDSVD compare channels one to one) learns from a WRN-16-1 teacher instead, and is
set against AT from that teacher. Init stages are left out: a method that trains only there is
not timed, the others are timed in the main stage (--init_epochs 0); an init epoch trains less
than a main one.
"""
import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from epoch_speed import last_epoch, random_subset  # noqa: E402

import methods  # noqa: E402
from engine.devices import cpu_has_bf16  # noqa: E402
from engine.errors import UserError  # noqa: E402

AT = 'AT'  # the row every other is set against


def rows(n_train):
    """(label, flags, teacher width, the AT row it is set against) of every method's examples."""
    wide, narrow = methods.probe('wrn_16_2', 'wrn_16_1'), methods.probe('wrn_16_1', 'wrn_16_1')
    found = [('student alone', None, 2, AT)]
    for m in methods.all_methods():
        if m.init_only:
            continue
        for label, options in m.examples.items():
            options = methods.for_training_set({**options, **({'init_epochs': 0} if m.init_stage else {})}, n_train)
            flags = [f for k, v in options.items() for f in (f'--{k}', str(v))]
            try:
                m.refuse_pair(argparse.Namespace(**{**vars(methods.defaults()), **options}), wide)
                found.append((label, flags, 2, AT))
            except UserError:  # it cannot compare the pair: a teacher of the student's widths
                m.refuse_pair(argparse.Namespace(**{**vars(methods.defaults()), **options}), narrow)
                found.append((f'{label}, WRN-16-1 teacher', flags, 1, f'{AT}, WRN-16-1 teacher'))
    at_flags = next(flags for label, flags, _, _ in found if label == AT)
    if any(width == 1 for _, _, width, _ in found):
        found.append((f'{AT}, WRN-16-1 teacher', at_flags, 1, f'{AT}, WRN-16-1 teacher'))
    return found


def epoch_seconds(flags, data, device, epochs, teacher_width=2):
    """(train, test) seconds of the last epoch; flags None: the student alone."""
    common = ['--epochs', str(epochs), '--compile', 'off']
    if flags is None:
        last = last_epoch(common, 'plain', data, device)
    else:
        last = last_epoch(common + ['--teacher_id', 'random'] + flags, 'at', data, device, teacher_width)
    return last['train_time'], last['test_time']


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--train_images', type=int, default=5000)
    p.add_argument('--test_images', type=int, default=1000)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--only', nargs='*', metavar='METHOD',
                   help='measure these methods (names as in the table) and the AT they are set against')
    args = p.parse_args()
    table = rows(args.train_images)
    if args.only:
        unknown = set(args.only) - {r[0] for r in table}
        if unknown:
            p.error(f'--only: no method named {", ".join(sorted(unknown))}')
        against = {r[3] for r in table if r[0] in args.only}
        table = [r for r in table if r[0] in args.only or r[0] in against]
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = random_subset(args.dataroot, args.train_images, args.test_images, 4)
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'{len(data["train"][0])} train + {len(data["test"][0])} test images, torch {torch.__version__}, {machine}')
    times = {}
    for name, flags, teacher_width, _ in table:
        times[name] = epoch_seconds(flags, data, device, args.epochs, teacher_width)
    print('\n| method | flags | train s | test s | epoch vs AT |\n| --- | --- | --- | --- | --- |')
    for name, flags, _, against in table:
        train_s, test_s = times[name]
        shown = ' '.join(flags) if flags else '(no teacher)'
        ratio = (train_s + test_s) / sum(times[against])
        print(f'| {name} | `{shown}` | {train_s:.1f} | {test_s:.1f} | {ratio:.2f}x |')


if __name__ == '__main__':
    main()

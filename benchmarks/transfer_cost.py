"""Per-epoch cost of each transfer method, relative to plain AT measured in the same run.

    python3 benchmarks/transfer_cost.py --dataroot <CIFAR-10 image tree or python release>

WRN-16-1 student, WRN-16-2 teacher (random weights cost the same arithmetic as trained ones),
batch 128, the default fast path (bf16 autocast where the hardware is fast at it, channels_last,
fused SGD) without torch.compile, which the gradient-based methods cannot use; so every method
runs the same kind of step. Each method trains two epochs on a random subset; the second epoch
(training + test) is timed. The weights are the ones scripts/table1.sh and scripts/crd_table.sh
use; they do not change the cost. FSP and KDSVD compare channels one to one, so they learn from a
WRN-16-1 teacher instead, and are set against AT from that teacher. The init stages of AB, FT
and FSP are left out (FT and FSP are timed in the main stage, --init_epochs 0): an init epoch
trains less than a main one.
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
    ('SP', ['--sp_beta', '3000']),
    ('CC', ['--cc_beta', '0.02']),
    ('RKD', ['--rkd_beta', '1']),
    ('PKT', ['--pkt_beta', '30000']),
    ('NST', ['--nst_beta', '50']),
    ('VID', ['--vid_beta', '1']),
    ('DKD', ['--dkd_beta', '1']),
    ('KD, standardised logits', ['--alpha', '0.9', '--logit_stand']),
    ('FitNets, ConvReg', ['--fitnet_beta', '100', '--fitnet_regressor', 'convreg']),
    ('CRD', ['--crd_beta', '0.8', '--crd_nce_k', '1024']),  # the subset's size bounds the negatives
    ('CRD+KD', ['--crd_beta', '0.8', '--kd_beta', '1', '--crd_nce_k', '1024']),
    ('FT, main stage', ['--ft_beta', '200', '--init_epochs', '0']),
    ('OFD', ['--ofd_beta', '1e-3']),
    ('ReviewKD', ['--reviewkd_beta', '5']),
]
# Methods that need a teacher of the student's widths, with the AT they are measured against.
SAME_WIDTH_METHODS = [
    ('AT, WRN-16-1 teacher', ['--beta', '1e3']),
    # A random teacher's FSP matrices are large: at weight 50 the loss leaves the finite range.
    ('FSP, WRN-16-1 teacher', ['--fsp_beta', '0.01', '--init_epochs', '0']),  # the main-stage term
    ('KDSVD, WRN-16-1 teacher', ['--kdsvd_beta', '1']),
]


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
    rows = [(name, flags, 2, 'AT') for name, flags in METHODS] + \
        [(name, flags, 1, SAME_WIDTH_METHODS[0][0]) for name, flags in SAME_WIDTH_METHODS]
    if args.only:
        unknown = set(args.only) - {r[0] for r in rows}
        if unknown:
            p.error(f'--only: no method named {", ".join(sorted(unknown))}')
        against = {r[3] for r in rows if r[0] in args.only}
        rows = [r for r in rows if r[0] in args.only or r[0] in against]
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = random_subset(args.dataroot, args.train_images, args.test_images, 4)
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'{len(data["train"][0])} train + {len(data["test"][0])} test images, torch {torch.__version__}, {machine}')
    times = {}
    for name, flags, teacher_width, _ in rows:
        times[name] = epoch_seconds(flags, data, device, args.epochs, teacher_width)
    print('\n| method | flags | train s | test s | epoch vs AT |\n| --- | --- | --- | --- | --- |')
    for name, flags, _, against in rows:
        train_s, test_s = times[name]
        shown = ' '.join(flags) if flags else '(no teacher)'
        ratio = (train_s + test_s) / sum(times[against])
        print(f'| {name} | `{shown}` | {train_s:.1f} | {test_s:.1f} | {ratio:.2f}x |')


if __name__ == '__main__':
    main()

"""Times training epochs of the original code's pipeline against this suite's, on the same images.

    python3 benchmarks/epoch_speed.py --dataroot DIR [--mode at|plain] [--train_images 10000]

(a) `original`: the 2017 code's way, re-implemented: torchvision transforms on PIL images in a
    DataLoader with worker processes, fp32 NCHW step, a host sync (.item()) per batch for every
    meter, plain SGD.
(b) `ours --reference`: this suite's loop and in-memory loader, fp32 NCHW arithmetic.
(c) `ours`: the default fast path (bf16 autocast and channels_last where the hardware is fast
    at them, fused SGD).
Each epoch is training on --train_images plus testing on --test_images; the last of --epochs
epochs is reported (the first pays for one-off set-up). Mode `at`: WRN-16-1 student, WRN-16-2
teacher, AT + KD loss; mode `plain`: WRN-16-1 alone.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar  # noqa: E402
from datasets.cifar import MEAN, STD, Loader, load_cifar  # noqa: E402
from engine.devices import cpu_has_bf16, uses_channels_last  # noqa: E402
from engine.members import build_members  # noqa: E402
from engine.training import train  # noqa: E402
from resnet import resnet  # noqa: E402
from utils import at_loss, distillation  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform
        
    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def original_epochs(args, data, device):
    """The original pipeline: per-image PIL transforms in workers, .item() per batch."""
    normalize = [T.ToTensor(), T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])]
    augment = T.Compose([T.Pad(4, padding_mode='reflect'), T.RandomHorizontalFlip(), T.RandomCrop(32), *normalize])
    train_ds = PILDataset(*data['train'], augment)
    test_ds = PILDataset(*data['test'], T.Compose(normalize))
    kw = dict(batch_size=128, num_workers=args.nthread, pin_memory=device.type == 'cuda')
    train_dl = torch.utils.data.DataLoader(train_ds, shuffle=True, **kw)
    test_dl = torch.utils.data.DataLoader(test_ds, shuffle=False, **kw)
    f_s, params_s, teacher = networks(args.mode)
    params = params_s if teacher is None else {**{'student.' + k: v for k, v in params_s.items()},
                                               **{'teacher.' + k: v for k, v in teacher[1].items()}}
    params = to_device(params, device)
    opt = torch.optim.SGD([v for v in params.values() if v.requires_grad], 0.1, momentum=0.9,
                          weight_decay=5e-4, foreach=False)

    def h(x, y, mode):
        x, y = x.to(device), y.to(device)
        if teacher is None:
            y_s = f_s(x, params, mode)[0]
            return F.cross_entropy(y_s, y), y_s, y, []
        y_s, g_s = f_s(x, params, mode, 'student.')
        with torch.no_grad():
            y_t, g_t = teacher[0](x, params, 'teacher.')
        at_losses = [at_loss(s, t) for s, t in zip(g_s, g_t)]
        return distillation(y_s, y_t, y, 4, 0.9) + 1e3 * sum(at_losses), y_s, y, at_losses

    times = []
    for _ in range(args.epochs):
        start, meters = time.perf_counter(), []
        for x, y in train_dl:
            loss, y_s, y, at_losses = h(x, y, True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            meters.append((loss.item(), (y_s.argmax(1) == y).sum().item(), [a.item() for a in at_losses]))
        with torch.no_grad():
            for x, y in test_dl:
                loss, y_s, y, _ = h(x, y, False)
                meters.append((loss.item(), (y_s.argmax(1) == y).sum().item(), []))
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[-1]


def networks(mode, teacher_width=2):
    """WRN-16-1 student, and for 'at' a WRN-16-<teacher_width> teacher: (f_s, params_s, (f_t,
    params_t) or None). A random teacher costs the same arithmetic as a trained one."""
    torch.manual_seed(0)
    f_s, p_s = resnet(16, 1, 10)
    if mode == 'plain':
        return f_s, p_s, None
    f_t, p_t = resnet(16, teacher_width, 10)
    return f_s, p_s, (cifar.teacher_function(f_t), {k: v.requires_grad_(False) for k, v in p_t.items()})


def to_device(params, device):
    return {k: v.to(device).detach().requires_grad_(v.requires_grad) for k, v in params.items()}


def last_epoch(flags, mode, data, device, teacher_width=2):
    """Trains through cifar.py's options and the shared loop; the last log line."""
    with tempfile.TemporaryDirectory() as tmp:
        opt = cifar.parse_args(['--save', os.path.join(tmp, 'run'), '--seed', '0', '--data_seed', '0'] + flags)
        f_s, p_s, teacher = networks(mode, teacher_width)
        layout = dict(channels_last=uses_channels_last(opt))
        train_loader = Loader(*[t.to(device) for t in data['train']], 128, train=True, seed=0, **layout)
        test_loader = Loader(*[t.to(device) for t in data['test']], 128, train=False, **layout)
        members = build_members([opt], lambda: (f_s, p_s), teacher, image_size=32, device=device,
                                train_labels=train_loader.labels, **layout)
        train(opt, members, train_loader, test_loader, num_classes=10, device=device)
        with open(os.path.join(tmp, 'run', 'log.txt')) as log:
            return json.loads(log.readlines()[-1][len('json_stats: '):])


def our_epochs(args, data, device, reference):
    flags = ['--epochs', str(args.epochs), '--beta', '1e3', '--alpha', '0.9', '--compile', args.compile]
    last = last_epoch(flags + (['--reference'] if reference else []), args.mode, data, device)
    return last['train_time'] + last['test_time']


def random_subset(dataroot, n_train, n_test, nthread):
    """{'train': (images, labels), 'test': ...}: a seeded random subset of each split."""
    rng = torch.Generator().manual_seed(0)
    data = {}
    for split, n in (('train', n_train), ('test', n_test)):
        images, labels = load_cifar(dataroot, 'CIFAR10', split == 'train', nthread)
        keep = torch.randperm(len(images), generator=rng)[:n]
        data[split] = (images[keep], labels[keep])
    return data


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dataroot', required=True)
    p.add_argument('--mode', choices=['at', 'plain'], default='at')
    p.add_argument('--train_images', type=int, default=10000)
    p.add_argument('--test_images', type=int, default=2000)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--nthread', type=int, default=4, help='DataLoader workers of the original pipeline')
    p.add_argument('--compile', choices=['on', 'off'], default='on',
                   help='compile our fast path, as a run of 10+ epochs does (the first epoch pays for it)')
    p.add_argument('--only', choices=['original', 'reference', 'ours'], nargs='*',
                   default=['original', 'reference', 'ours'])
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = random_subset(args.dataroot, args.train_images, args.test_images, args.nthread)
    n = len(data['train'][0]) + len(data['test'][0])
    machine = torch.cuda.get_device_name() if device.type == 'cuda' else \
        f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 units: {cpu_has_bf16()}'
    print(f'mode {args.mode}: {len(data["train"][0])} train + {len(data["test"][0])} test images, '
          f'torch {torch.__version__}, {machine}')
    runs = {'original': lambda: original_epochs(args, data, device),
            'reference': lambda: our_epochs(args, data, device, reference=True),
            'ours': lambda: our_epochs(args, data, device, reference=False)}
    results = {}
    for name in args.only:
        results[name] = runs[name]()
    base = results.get('original')
    print('\n| pipeline | epoch (s) | images/s | vs original |\n| --- | --- | --- | --- |')
    for name, t in results.items():
        ratio = f'{base / t:.2f}x' if base else 'n/a'
        label = {'original': 'original (PIL + workers, fp32)', 'reference': 'ours --reference (fp32 NCHW)',
                 'ours': 'ours (default)'}[name]
        print(f'| {label} | {t:.1f} | {n / t:.0f} | {ratio} |')


if __name__ == '__main__':
    main()

"""What bounds one training step: kernels per step, device busy time against wall time.

    python3 benchmarks/profile_step.py [--mode at|plain] [--compile on|off]
                                       [--compile_mode default|reduce-overhead] [--steps 20]

Builds the step cifar.py trains with (WRN-16-1 student; for `at`, a WRN-16-2 teacher with random
weights, whose arithmetic is a trained one's) on the fastest device here, runs it on random
batches of 128 CIFAR-sized images, warms up (compilation, cuDNN's algorithm search), then
records --steps steps with torch.profiler. On a GPU a step whose device busy time is far below
its wall time is bound by launching kernels from the host, not by the arithmetic.
"""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar  # noqa: E402
from engine.cohort import member_runs  # noqa: E402
from engine.devices import speed_settings  # noqa: E402
from engine.members import build_members  # noqa: E402
from engine.training import make_steps  # noqa: E402
from resnet import resnet  # noqa: E402


def step_function(args, device):
    flags = ['--save', 'unused', '--seed', '0', '--compile', args.compile, '--compile_mode', args.compile_mode]
    if args.mode == 'at':
        flags += ['--teacher_id', 'random', '--beta', '1e3', '--alpha', '0.9']
    opt = cifar.parse_args(flags)
    speed = speed_settings(opt, device, 200)
    f_t, p_t = resnet(16, 2, 10)
    teacher = (lambda x, p, prefix: f_t(x, p, False, prefix), {k: v.requires_grad_(False) for k, v in p_t.items()})
    members = build_members(member_runs(opt, cifar.CIFAR_RULES, 'teacher_id'), lambda: resnet(16, 1, 10),
                            teacher if args.mode == 'at' else None, image_size=32, device=device,
                            channels_last=speed.channels_last)
    for m in members:
        m.start(speed.fused, 390, 1, device)
        m.weights.update(m.objective.weights(1, []))
    train_step, _ = make_steps(members, speed)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    state = SimpleNamespace(state=SimpleNamespace(iteration=1))
    return (lambda: train_step(state, (x, y, 1.0, torch.arange(len(y), device=y.device)))), speed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--mode', choices=['at', 'plain'], default='at')
    p.add_argument('--compile', choices=['on', 'off'], default='off')
    p.add_argument('--compile_mode', choices=['default', 'reduce-overhead'], default='default')
    p.add_argument('--batch_size', type=int, default=128)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=10)
    args = p.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    step, speed = step_function(args, device)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.events()
    if device.type == 'cuda':
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3 / args.steps  # ms
    else:
        kernels = [e for e in events if e.cpu_parent is None and e.name.startswith('aten::')]
        busy = sum(e.cpu_time_total for e in kernels) / 1e3 / args.steps
    device_name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    print(f'{args.mode} step, batch {args.batch_size}, {device_name}, torch {torch.__version__}, bf16 '
          f'{speed.autocast}, channels_last {speed.channels_last}, compile {speed.compile} ({args.compile_mode})')
    print('| mode | compile | wall ms/step | images/s | kernels (GPU) or top-level ops (CPU) per step | '
          'busy ms/step | busy / wall |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    print(f'| {args.mode} | {args.compile_mode if speed.compile else "off"} | {wall * 1e3:.2f} | '
          f'{args.batch_size / wall:.0f} | {len(kernels) / args.steps:.0f} | {busy:.2f} | {busy / (wall * 1e3):.2f} |')
    top = prof.key_averages().table(sort_by='cuda_time_total' if device.type == 'cuda' else 'cpu_time_total',
                                    row_limit=12)
    print(top)


if __name__ == '__main__':
    main()

"""The GPU path against the CPU: the same arithmetic, the same data, runs that move between the
two. Skipped where no CUDA device is visible; tests needing two GPUs are skipped on one."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, run_cli
from datasets import strong_view as sv
from datasets.cifar import Loader
from engine.members import join_networks
from resnet import define_student, resnet
from test_cifar import TINY, checkpoint, log_lines, ok
from test_training import cpu_speed, steps_of
from test_transfer import ALL_FLAGS, wrn_pair
from test_transfer import options as cifar_options
from utils import data_parallel

GPU = torch.device('cuda')
CPU_ONLY = {'CUDA_VISIBLE_DEVICES': ''}
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 comparisons with the CPU need full fp32 on the GPU as well."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def on(params, device, dtype):
    return {k: v.detach().to(device, dtype).requires_grad_(v.requires_grad) for k, v in params.items()}


def forward_backward(f, params, x, y):
    logits, groups = f(x, params, True)
    loss = torch.nn.functional.cross_entropy(logits, y) + sum(g.pow(2).mean() for g in groups)
    loss.backward()
    return [logits, *groups], {k: v.grad for k, v in params.items() if v.requires_grad}


@pytest.mark.parametrize('dtype, rtol, atol', [(torch.float64, 1e-9, 1e-12), (torch.float32, 1e-3, 1e-4)])
@pytest.mark.parametrize('network', ['wrn', 'resnet18'])
def test_forward_and_backward_match_the_cpu(network, dtype, rtol, atol):
    torch.manual_seed(0)
    f, params = resnet(10, 1, 10) if network == 'wrn' else define_student(18, 0.25, 10)
    size = 32 if network == 'wrn' else 64
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    cpu, gpu = on(params, 'cpu', dtype), on(params, GPU, dtype)
    out_c, grad_c = forward_backward(f, cpu, x.to(dtype), y)
    out_g, grad_g = forward_backward(f, gpu, x.to(GPU, dtype), y.to(GPU))
    for a, b in zip(out_c, out_g):
        torch.testing.assert_close(b.cpu(), a.detach(), rtol=rtol, atol=atol)
    for k in grad_c:
        torch.testing.assert_close(grad_g[k].cpu(), grad_c[k], rtol=rtol, atol=atol)
    for k in cpu:  # running statistics included
        torch.testing.assert_close(gpu[k].detach().cpu(), cpu[k].detach(), rtol=rtol, atol=atol)


def test_every_transfer_term_matches_the_cpu_in_fp64():
    f_s, p_s, teacher = wrn_pair()
    transfer, params = join_networks(cifar_options('--teacher_id', 't', *ALL_FLAGS), f_s, p_s, teacher)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    cpu, gpu = on(params, 'cpu', torch.float64), on(params, GPU, torch.float64)
    _, terms_c = transfer(x, y, cpu, True)
    _, terms_g = transfer(x.to(GPU), y.to(GPU), gpu, True)
    assert list(terms_c) == list(terms_g) and 'grad_at' in terms_g
    for n in terms_c:
        torch.testing.assert_close(terms_g[n].cpu(), terms_c[n].detach(), rtol=1e-9, atol=1e-12, msg=n)


def test_loader_on_the_gpu_covers_each_image_once_and_skips_to_the_tail():
    images = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 32, 32).to(torch.uint8).to(GPU)
    loader = Loader(images, torch.arange(10, device=GPU), batch_size=4, train=True, seed=7, channels_last=True)

    def epoch(e, skip=0):
        loader.set_epoch(e, skip)
        return [b for b in loader]

    first = epoch(1)
    labels = torch.cat([y for _, y, _, _ in first]).tolist()
    assert sorted(labels) == list(range(10)) and first[0][0].device == images.device
    assert first[0][0].is_contiguous(memory_format=torch.channels_last)
    again, tail = epoch(1), epoch(1, skip=1)
    for (a, b, *_), (c, d, *_) in zip(first, again):
        assert torch.equal(a, c) and torch.equal(b, d)
    assert len(tail) == 2 and all(torch.equal(a[0], c[0]) for a, c in zip(first[1:], tail))


def gpu_steps(compile=False, autocast=True):
    """A cohort of two WRN-10 students (AT+KD and alone) of one teacher, on the GPU."""
    speed = cpu_speed(autocast=autocast, compile=compile, device_type='cuda')
    return steps_of('--cohort', '[{"name": "at", "beta": 1000, "alpha": 0.9}, {"name": "alone"}]',
                    speed=speed, teacher=True, device='cuda')


def test_twenty_training_steps_never_wait_for_the_gpu():
    """Meters, divergence watch, loader and step all stay on the device: any host sync raises."""
    members, (train_step, _) = gpu_steps()
    images = torch.randint(0, 256, (20 * 8, 3, 32, 32), dtype=torch.uint8, device=GPU)
    loader = Loader(images, torch.randint(0, 10, (20 * 8,), device=GPU), 8, train=True, channels_last=True)
    loader.set_epoch(1)
    for m in members:
        m.train_meters.reset()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for i, batch in enumerate(loader, 1):
            for m, output in train_step(SimpleNamespace(state=SimpleNamespace(iteration=i)), batch).items():
                m.train_meters.update(output)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert i == 20 and all(m.train_meters.compute()['loss'][0] > 0 for m in members)


def test_compiled_step_equals_the_eager_step():
    """In fp32 (TF32 off) the compiled step only reorders sums."""
    x, y = torch.randn(8, 3, 32, 32, device=GPU), torch.randint(0, 10, (8,), device=GPU)
    results = []
    for compile in (False, True):
        members, (train_step, eval_step) = gpu_steps(compile=compile, autocast=False)
        losses = [o['loss'] for o in train_step(SimpleNamespace(state=SimpleNamespace(iteration=1)),
                                                 (x, y, 1.0, torch.arange(8, device=GPU))).values()]
        for m in members:
            m.evaluating = True
        logits = [o['y_pred'] for o in eval_step(None, (x, y, 1.0, torch.arange(8, device=GPU))).values()]
        results.append((losses, logits, [m.params for m in members]))
    for a, b in zip(*results):
        for u, v in zip(a, b):
            if isinstance(u, dict):
                for k in u:
                    torch.testing.assert_close(v[k], u[k], rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4)


# The methods of 2022-2025 with what each reads beyond the logits: a learned temperature (CTKD),
# the last map and the classifier (CAT-KD, SDD), the strong view (MLKD).
PART_3 = {
    'mlkd': ['--mlkd_beta', 0.9, '--ce_weight', 0.1],
    'mlkd_ls': ['--mlkd_beta', 9, '--ce_weight', 0.1, '--temperature', 2, '--logit_stand'],
    'ctkd_kd': ['--alpha', 0.9, '--ctkd'],
    'ctkd_dkd': ['--dkd_beta', 1, '--dkd_warmup', 0, '--ctkd'],
    'wttm': ['--wttm_beta', 4, '--wttm_gamma', 0.2],
    'nkd': ['--nkd_beta', 1, '--nkd_gamma', 3.5, '--nkd_temperature', 3],
    'catkd': ['--catkd_beta', 12, '--catkd_size', 2],
    'sdd_dkd': ['--sdd_beta', 1, '--sdd_base', 'dkd', '--sdd_scales', '1,2', '--sdd_warmup', 0],
}


@pytest.mark.parametrize('method', sorted(PART_3))
def test_each_newer_method_matches_the_cpu_in_fp64(method):
    transfer, params = join_networks(cifar_options('--teacher_id', 't', *PART_3[method]), *wrn_pair())
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    results = []
    for device in ('cpu', GPU):
        p = on(params, device, torch.float64)
        strong = (x2.to(device), None) if transfer.strong_view else None
        _, terms = transfer(x.to(device), y.to(device), p, True, strong=strong)
        sum(terms.values()).backward()
        results.append((terms, {k: v.grad for k, v in p.items() if v.grad is not None}))
    (terms_c, grads_c), (terms_g, grads_g) = results
    assert list(terms_c) == list(terms_g) and list(grads_c) == list(grads_g) and grads_c
    for n in terms_c:
        torch.testing.assert_close(terms_g[n].detach().cpu(), terms_c[n].detach(), rtol=1e-9, atol=1e-12, msg=n)
    for k in grads_c:
        torch.testing.assert_close(grads_g[k].cpu(), grads_c[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize('name', [op for op, _, _ in sv.OPERATIONS if op != 'identity'])
def test_each_strong_view_operation_on_the_gpu_is_the_cpus(name):
    """The same images and magnitudes give the same pixels on either device, up to a rounding of
    the float arithmetic in between (one level, in a few pixels)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, :, :12] //= 3
    low, high = next((lo, hi) for op, lo, hi in sv.OPERATIONS if op == name)
    v = (low + (high - low) * torch.rand(16, generator=g, dtype=torch.float64)).float()
    a, b = sv.APPLY[name](x, v), sv.APPLY[name](x.to(GPU), v.to(GPU)).cpu()
    diff = (a.int() - b.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, diff.max(), (diff > 0).float().mean())


def test_the_newer_methods_train_and_resume_bit_for_bit_on_the_gpu(image_tree, tmp_path):
    """Every method of 2022-2025 in one cohort on the GPU (the strong view drawn there, DOT's two
    momenta, CTKD's temperature, two DML peers beside the teacher): stopped after an epoch and
    resumed, each member ends bit for bit where the uninterrupted cohort ends, with finite losses."""
    common = [*TINY, '--width', 1, '--epoch_step', '[2]', '--dataroot', image_tree, '--deterministic']
    ok(run_cli('cifar.py', *common, '--epochs', 1, '--seed', 1, '--save', 'logs/teacher', cwd=tmp_path))
    members = [{'name': 'mlkd', 'seed': 2, 'mlkd_beta': 0.9, 'ce_weight': 0.1},
               {'name': 'ctkd', 'seed': 2, 'alpha': 0.9, 'ctkd': True},
               {'name': 'wttm', 'seed': 2, 'wttm_beta': 4, 'wttm_gamma': 0.2},
               {'name': 'nkd', 'seed': 2, 'nkd_beta': 1, 'nkd_gamma': 3.5, 'nkd_temperature': 3},
               {'name': 'catkd', 'seed': 2, 'catkd_beta': 12, 'catkd_size': 2},
               {'name': 'sdd_dkd', 'seed': 2, 'sdd_beta': 1, 'sdd_base': 'dkd', 'sdd_scales': '1,2', 'sdd_warmup': 0},
               {'name': 'kd_dot', 'seed': 2, 'alpha': 0, 'ce_weight': 0.1, 'kd_beta': 0.9, 'dot_delta': 0.075},
               {'name': 'dml_1', 'seed': 3, 'alpha': 0.9, 'dml_beta': 1},
               {'name': 'dml_2', 'seed': 4, 'alpha': 0.9, 'dml_beta': 1}]
    run = [*common, '--width', 0.5, '--teacher_id', 'teacher', '--cohort', json.dumps(members)]
    ok(run_cli('cifar.py', *run, '--epochs', 2, '--save', 'logs/straight', cwd=tmp_path))
    ok(run_cli('cifar.py', *run, '--epochs', 1, '--save', 'logs/split', cwd=tmp_path))
    ok(run_cli('cifar.py', *run, '--epochs', 2, '--save', 'logs/split', '--resume', 'logs/split', cwd=tmp_path))
    for m in members:
        a = checkpoint(tmp_path / 'logs/straight' / m['name'])['params']
        b = checkpoint(tmp_path / 'logs/split' / m['name'])['params']
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m['name']
        straight, split = (log_lines(tmp_path / 'logs' / which / m['name']) for which in ('straight', 'split'))
        assert [r['epoch'] for r in straight] == [r['epoch'] for r in split] == [1, 2], m['name']
        for key in ('train_loss', 'test_loss', 'test_acc'):
            assert [r[key] for r in straight] == [r[key] for r in split], (m['name'], key)
        assert all(math.isfinite(r['train_loss']) and math.isfinite(r['test_loss']) for r in straight), m['name']


# ----------------------------------------------------------------------------------------------
# Runs through the command line

def test_resume_on_the_gpu_moves_between_devices(image_tree, tmp_path):
    common = [*TINY, '--width', 1, '--epoch_step', '[2]', '--seed', 3, '--dataroot', image_tree, '--deterministic']
    ok(run_cli('cifar.py', *common, '--epochs', 2, '--save', 'logs/straight', cwd=tmp_path))
    ok(run_cli('cifar.py', *common, '--epochs', 1, '--save', 'logs/split', cwd=tmp_path))
    ok(run_cli('cifar.py', *common, '--epochs', 2, '--save', 'logs/split', '--resume', 'logs/split/model.pt7',
               cwd=tmp_path))
    a, b = checkpoint(tmp_path / 'logs/straight')['params'], checkpoint(tmp_path / 'logs/split')['params']
    for k in a:  # deterministic kernels: the continuation is bitwise the uninterrupted run
        assert torch.equal(a[k], b[k]), k
    # a GPU checkpoint continues on the CPU and teaches there; a CPU checkpoint continues on the GPU
    ok(run_cli('cifar.py', *common, '--epochs', 3, '--save', 'logs/split', '--resume', 'logs/split/model.pt7',
               cwd=tmp_path, env=CPU_ONLY))
    ok(run_cli('cifar.py', *common, '--epochs', 1, '--width', 0.5, '--teacher_id', 'split', '--beta', 1e3,
               '--save', 'logs/student', cwd=tmp_path, env=CPU_ONLY))
    ok(run_cli('cifar.py', *common, '--epochs', 4, '--save', 'logs/split', '--resume', 'logs/split/model.pt7',
               cwd=tmp_path))
    assert [r['epoch'] for r in log_lines(tmp_path / 'logs/split')] == [1, 2, 3, 4]
    assert log_lines(tmp_path / 'logs/student')[0]['at_losses'][0][0] > 0


# ----------------------------------------------------------------------------------------------
# Two GPUs

@two_gpus
def test_ngpu_replicas_compute_what_one_gpu_computes_on_each_half():
    """--ngpu splits the batch: each GPU normalises its half with its own batch statistics (as
    the original code did), and only the first GPU's half updates the running statistics."""
    torch.manual_seed(0)
    f, params = resnet(10, 1, 10)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, device=GPU)
    split, whole = on(params, GPU, torch.float64), on(params, GPU, torch.float64)
    logits = data_parallel(lambda x, p, m: f(x, p, m)[0], x, split, True, [0, 1])
    spare = {k: v.clone() for k, v in whole.items()}
    by_hand = torch.cat([f(x[:4], whole, True)[0], f(x[4:], spare, True)[0]])
    torch.testing.assert_close(logits, by_hand, rtol=1e-9, atol=1e-12)
    logits.sum().backward()
    by_hand.sum().backward()
    for k in split:
        if split[k].requires_grad:
            torch.testing.assert_close(split[k].grad, whole[k].grad + spare[k].grad, rtol=1e-9, atol=1e-12)
        else:
            torch.testing.assert_close(split[k], whole[k], rtol=1e-9, atol=1e-12)


@two_gpus
def test_ngpu_replicas_run_in_bf16_like_the_main_thread():
    dtypes = []

    def f(x, p, mode):
        y = torch.nn.functional.conv2d(x, p['w'])
        dtypes.append(y.dtype)
        return y

    params = {'w': torch.randn(4, 3, 3, 3, device=GPU, requires_grad=True)}
    with torch.autocast('cuda', torch.bfloat16):
        data_parallel(f, torch.randn(4, 3, 8, 8, device=GPU), params, True, [0, 1])
    assert dtypes == [torch.bfloat16] * 2


@two_gpus
def test_two_processes_with_nccl_match_one_process(image_tree, tmp_path):
    args = ['--depth', 10, '--width', 1, '--batch_size', 25, '--epochs', 2, '--seed', 5, '--dtype', 'double',
            '--dataroot', image_tree, '--nthread', 1, '--deterministic']
    ok(run_cli('cifar.py', *args, '--save', 'logs/one', cwd=tmp_path))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          os.path.join(ROOT, 'cifar.py'), *map(str, args), '--save', 'logs/two'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = checkpoint(tmp_path / 'logs/one')['params'], checkpoint(tmp_path / 'logs/two')['params']
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-10)

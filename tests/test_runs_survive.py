"""Interrupted, killed, diverging and distributed runs, through the real CLI."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import torch

import cifar
from conftest import ROOT, run_cli, run_in_process

# --deterministic: on a GPU, bitwise equal resumes need deterministic kernels (no effect on CPU)
SLOW = ['--depth', 10, '--width', 1, '--batch_size', 4, '--nthread', 2, '--seed', 4, '--epochs', 3, '--deterministic',
        '--precision', 'fp32']


def start(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='2')
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'cifar.py'), *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log_lines(run_dir, n, proc, timeout=120):
    path = os.path.join(run_dir, 'log.txt')
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and len(open(path).readlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError('run did not reach its log line in time')


def load(run_dir):
    return torch.load(os.path.join(run_dir, 'model.pt7'), map_location='cpu', weights_only=True)


def epochs_logged(run_dir):
    """The epoch of each complete line; a last line that a kill cut short has no newline."""
    return [json.loads(line[12:])['epoch'] for line in open(os.path.join(run_dir, 'log.txt')) if line.endswith('\n')]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(image_tree, tmp_path):
    data = ['--dataroot', image_tree]
    assert run_cli('cifar.py', *SLOW, *data, '--save', 'logs/straight', cwd=tmp_path).returncode == 0
    proc = start([*SLOW, *data, '--save', 'logs/stopped'], tmp_path)
    wait_for_log_lines(tmp_path / 'logs/stopped', 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'stopped by SIGTERM' in err and err.strip().endswith('resume with --resume logs/stopped')
    assert 'Traceback' not in err
    ckpt = load(tmp_path / 'logs/stopped')
    assert ckpt['iteration'] >= 25 and ckpt['epoch'] == (ckpt['iteration']) // 25
    assert epochs_logged(tmp_path / 'logs/stopped') == list(range(1, ckpt['epoch'] + 1))
    r = run_cli('cifar.py', *SLOW, *data, '--save', 'logs/stopped', '--resume', 'logs/stopped/model.pt7', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert epochs_logged(tmp_path / 'logs/stopped') == [1, 2, 3]
    assert_same_params(load(tmp_path / 'logs/straight')['params'], load(tmp_path / 'logs/stopped')['params'])


def test_sigkill_leaves_a_loadable_checkpoint_that_resumes(image_tree, tmp_path):
    data = ['--dataroot', image_tree]
    proc = start([*SLOW, *data, '--save', 'logs/killed'], tmp_path)
    wait_for_log_lines(tmp_path / 'logs/killed', 1, proc)
    time.sleep(0.3)  # somewhere in the next epoch, possibly while a checkpoint or log line is written
    proc.kill()
    proc.communicate()
    ckpt = load(tmp_path / 'logs/killed')
    # Wherever the kill landed: the checkpoint loads and is at least as far as the log (a last
    # line may be torn, a temporary file and the dead process's run.lock may be left).
    assert ckpt['epoch'] >= len(epochs_logged(tmp_path / 'logs/killed')) and ckpt['log']['epoch'] == ckpt['epoch'] >= 1
    r = run_cli('cifar.py', *SLOW, *data, '--save', 'logs/killed', '--resume', 'logs/killed/model.pt7', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # The resume took the folder over, cleared what the kill left, and repaired the log.
    assert open(tmp_path / 'logs/killed/log.txt').read().endswith('\n')
    assert epochs_logged(tmp_path / 'logs/killed') == [1, 2, 3] and load(tmp_path / 'logs/killed')['epoch'] == 3
    left = sorted(os.listdir(tmp_path / 'logs/killed'))
    assert 'run.lock' not in left and not [n for n in left if n.endswith('.tmp')], left


def test_ctrl_c_checkpoints_and_a_resume_without_seed_matches_an_uninterrupted_run(image_tree, tmp_path):
    data = ['--dataroot', image_tree]
    assert run_cli('cifar.py', *SLOW, *data, '--save', 'logs/straight', cwd=tmp_path).returncode == 0
    proc = start([*SLOW, *data, '--save', 'logs/c'], tmp_path)
    wait_for_log_lines(tmp_path / 'logs/c', 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT and 'stopped by SIGINT' in err and 'Traceback' not in err, err
    assert load(tmp_path / 'logs/c')['epoch'] >= 1
    at = SLOW.index('--seed')
    unseeded = SLOW[:at] + SLOW[at + 2:]
    r = run_cli('cifar.py', *unseeded, *data, '--save', 'logs/c', '--resume', 'logs/c/model.pt7', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line[12:]) for line in open(tmp_path / 'logs/c/log.txt')]
    assert [(o['epoch'], o['seed'], o['data_seed']) for o in lines] == [(e, 4, 4) for e in (1, 2, 3)]
    assert_same_params(load(tmp_path / 'logs/straight')['params'], load(tmp_path / 'logs/c')['params'])


def test_a_second_signal_stops_at_once_and_says_which_checkpoint_stands(image_tree, tmp_path):
    proc = start([*SLOW, '--dataroot', image_tree, '--save', 'logs/s'], tmp_path)
    wait_for_log_lines(tmp_path / 'logs/s', 1, proc)
    # Both signals reach the process at the same instant, wherever it was (in a step, writing a
    # checkpoint): Python runs the SIGINT handler first, then SIGTERM's.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in err, err[-2000:]
    assert err.count('stopped') == 1, err[-2000:]
    epoch = load(tmp_path / 'logs/s')['epoch']
    assert (f'cifar.py: stopped at once by SIGTERM, a second signal: the current step was abandoned; the last '
            f'checkpoint, logs/s/model.pt7 (after epoch {epoch}), stands: resume with --resume logs/s') in err, \
        err[-2000:]
    left = os.listdir(tmp_path / 'logs/s')
    assert 'run.lock' not in left and not [n for n in left if n.endswith('.tmp')], left  # released, cleaned up


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(image_tree, tmp_path):
    # from epoch 2 on the learning rate is 1e29: the run diverges after its first checkpoint
    common = ['--depth', 10, '--batch_size', 32, '--dataroot', image_tree, '--save', 'logs/d', '--epoch_step', '[2]',
              '--lr_decay_ratio', 1e30, '--epochs', 1]
    assert run_cli('cifar.py', *common, cwd=tmp_path).returncode == 0
    before = open(tmp_path / 'logs/d/model.pt7', 'rb').read()
    r = run_cli('cifar.py', *common[:-1], 3, '--resume', 'logs/d/model.pt7', cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'Traceback' not in r.stderr
    assert 'diverged at epoch 2, step' in err[0] and 'cross_entropy' in err[0]
    assert 'last good checkpoint is logs/d/model.pt7' in err[0]
    assert open(tmp_path / 'logs/d/model.pt7', 'rb').read() == before
    assert epochs_logged(tmp_path / 'logs/d') == [1]


QUICK = ['--depth', 10, '--width', 1, '--batch_size', 32, '--nthread', 2, '--seed', 2, '--epochs', 2]


def full_disk_at(n, real, writes_target):
    """`real` (open or os.replace), except that its n-th call that `writes_target(*args)` finds
    the disk full."""
    calls = []

    def call(*args, **kwargs):
        if writes_target(*args):
            calls.append(args)
            if len(calls) == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    return call


def test_a_full_disk_ends_the_run_with_one_line_and_the_resume_completes_it(image_tree, tmp_path):
    run = [*QUICK, '--dataroot', image_tree, '--save', 'logs/w']
    resume = [*run, '--resume', 'logs/w/model.pt7']
    with mock.patch('os.replace', full_disk_at(2, os.replace, lambda src, dst: dst.endswith('model.pt7'))):
        r = run_in_process(cifar.main, *run, cwd=tmp_path)
    assert r.returncode == 74 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert ('cannot write logs/w/model.pt7 (No space left on device); the last good checkpoint logs/w/model.pt7 '
            '(after epoch 1) and its log line are intact; free space and resume with --resume logs/w') in r.stderr
    assert load(tmp_path / 'logs/w')['epoch'] == 1 and epochs_logged(tmp_path / 'logs/w') == [1]
    assert not [n for n in os.listdir(tmp_path / 'logs/w') if n.endswith('.tmp') or n == 'run.lock']
    assert run_in_process(cifar.main, *resume, cwd=tmp_path).returncode == 0
    assert epochs_logged(tmp_path / 'logs/w') == [1, 2]

    appends_log = lambda path, mode='r', *_: path.endswith('log.txt') and mode == 'a'  # noqa: E731
    with mock.patch('engine.checkpoint.open', full_disk_at(2, open, appends_log), create=True):
        r = run_in_process(cifar.main, *run[:-1], 'logs/l', cwd=tmp_path)
    assert r.returncode == 74, r.stderr[-2000:]
    assert ('cannot write logs/l/log.txt (No space left on device); the checkpoint logs/l/model.pt7 (after '
            'epoch 2) holds this epoch\'s line and resuming writes it; free space and resume with') in r.stderr
    assert epochs_logged(tmp_path / 'logs/l') == [1]
    r = run_in_process(cifar.main, *resume[:-3], 'logs/l', '--resume', 'logs/l/model.pt7', cwd=tmp_path)
    assert r.returncode == 0 and 'restored the line of epoch 2 from the checkpoint' in r.stderr, r.stderr[-2000:]
    assert epochs_logged(tmp_path / 'logs/l') == [1, 2]


def test_a_resume_repairs_a_torn_last_log_line(image_tree, tmp_path):
    run = [*QUICK[:-1], 1, '--dataroot', image_tree, '--save', 'logs/t']
    assert run_in_process(cifar.main, *run, cwd=tmp_path).returncode == 0
    log = tmp_path / 'logs/t/log.txt'
    log.write_text(log.read_text()[:200])  # the power went while the line was appended
    r = run_in_process(cifar.main, *QUICK, '--dataroot', image_tree, '--save', 'logs/t',
                       '--resume', 'logs/t/model.pt7', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'logs/t/log.txt: dropped its cut-short last line and restored the line of epoch 1' in r.stderr
    assert [json.loads(line[12:])['epoch'] for line in open(log)] == [1, 2]


def torchrun(*launcher, args, cwd):
    # Hidden GPUs: the processes use gloo on the CPU, so this runs on one-GPU machines too.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *launcher, os.path.join(ROOT, 'cifar.py'),
                             *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_and_two_nodes_under_torchrun_match_one_process(image_tree, tmp_path):
    # In float64 the only difference left is summation order, so the match is tight; in float32
    # the same rounding differences grow over steps to about 1e-3. Batches of 25 split 13/12:
    # each process's loss is weighted by its share.
    args = ['--depth', 10, '--width', 1, '--batch_size', 25, '--epochs', 2, '--seed', 5, '--dtype', 'double',
            '--dataroot', image_tree, '--nthread', 1]
    one = run_cli('cifar.py', *args, '--save', 'logs/one', cwd=tmp_path, env={'CUDA_VISIBLE_DEVICES': ''})
    assert one.returncode == 0, one.stderr[-2000:]
    out = finished(torchrun('--standalone', '--nproc_per_node', '2', args=[*args, '--save', 'logs/two'], cwd=tmp_path))
    assert out.count('(2/2), test_acc') == 1  # only rank 0 reports
    # Two machines, emulated by two launchers on this one meeting at a c10d rendezvous.
    node = ['--nnodes', '2', '--nproc_per_node', '1', '--rdzv_backend', 'c10d',
            '--rdzv_endpoint', f'127.0.0.1:{free_port()}', '--rdzv_id', 'two-nodes']
    nodes = [torchrun(*node, args=[*args, '--save', 'logs/nodes'], cwd=tmp_path) for _ in range(2)]
    assert sum(finished(n).count('(2/2), test_acc') for n in nodes) == 1
    a = load(tmp_path / 'logs/one')['params']
    for run in ('two', 'nodes'):
        assert epochs_logged(tmp_path / 'logs' / run) == [1, 2]
        b = load(tmp_path / 'logs' / run)['params']
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-10)
        la = json.loads(open(tmp_path / 'logs/one/log.txt').readlines()[-1][12:])
        lb = json.loads(open(tmp_path / 'logs' / run / 'log.txt').readlines()[-1][12:])
        # meters keep float32 values
        assert abs(la['train_loss'] - lb['train_loss']) < 1e-6 and la['test_acc'] == lb['test_acc']
        assert abs(la['test_loss'] - lb['test_loss']) < 1e-6 and la['train_acc'] == lb['train_acc']


def test_torchrun_refuses_compile_on_with_one_line(image_tree, tmp_path):
    proc = torchrun('--standalone', '--nproc_per_node', '2', cwd=tmp_path,
                    args=['--depth', 10, '--epochs', 1, '--dataroot', image_tree, '--compile', 'on',
                          '--save', 'logs/c'])
    out, err = proc.communicate(timeout=300)
    # torchrun adds its own report of a failed child; ours is the one line from rank 0
    assert proc.returncode != 0 and err.count('cifar.py: error: --compile on is not supported with torchrun') == 1
    assert not os.path.exists(tmp_path / 'logs/c')

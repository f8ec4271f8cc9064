"""A run folder belongs to one process at a time (run_lock.py): a second command is refused
with the holder's name, a dead holder's lock is taken over, and refused or failed commands
leave no folder behind."""
import fcntl
import json
import os
import socket
import time

import cifar
from conftest import run_cli, run_in_process
from engine.run_lock import lock_run_dir, release_run_dirs
from test_runs_survive import start, wait_for_log_lines

LONG = ['--depth', 10, '--width', 1, '--batch_size', 10, '--nthread', 2, '--seed', 3, '--epochs', 30]


def wait_for_lock(run_dir, proc, timeout=120):
    path = os.path.join(run_dir, 'run.lock')
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(open(path).read())['pid'] == proc.pid:
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError('the run did not take its lock in time')


def hold_lock(run_dir, pid=4242):
    """The lock of another, live process, as that process would hold it (an flock on its own
    open file)."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, 'run.lock'), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({'pid': pid, 'host': 'elsewhere', 'argv': ['cifar.py', '--save', 'x'],
                             'started': '2026-01-01 00:00:00 UTC'}).encode())
    return fd


def test_a_busy_folder_is_refused_and_a_dead_holders_lock_taken_over(image_tree, tmp_path):
    args = [*LONG, '--dataroot', image_tree, '--save', 'logs/x']
    first = start(args, tmp_path)
    try:
        wait_for_lock(tmp_path / 'logs/x', first)
        # The same command again, before the first has written anything to the folder.
        again = run_cli('cifar.py', *args, cwd=tmp_path)
        err = again.stderr.strip().splitlines()
        assert again.returncode == 2 and len(err) == 1, again.stderr[-2000:]
        assert f'logs/x is in use by pid {first.pid} on host {socket.gethostname()} since ' in err[0]
        assert '--save logs/x' in err[0] and 'delete logs/x/run.lock' in err[0]
        wait_for_log_lines(tmp_path / 'logs/x', 1, first)
        resumed = run_cli('cifar.py', *args, '--resume', 'logs/x/model.pt7', cwd=tmp_path)
        assert resumed.returncode == 2 and f'in use by pid {first.pid}' in resumed.stderr, resumed.stderr[-2000:]
        assert first.poll() is None  # the refusals did not disturb it
    finally:
        first.kill()
        first.communicate()
    assert json.loads((tmp_path / 'logs/x/run.lock').read_text())['pid'] == first.pid  # left by kill -9
    (tmp_path / 'logs/x/.model.pt7.99999.tmp').write_bytes(b'half a checkpoint')  # a killed write's
    took = run_cli('cifar.py', *args[:-2], '--epochs', 1, '--save', 'logs/x', '--resume', 'logs/x/model.pt7',
                   cwd=tmp_path)
    assert took.returncode == 0, took.stderr[-2000:]
    assert f'logs/x/run.lock was left by pid {first.pid} on host' in took.stderr
    assert 'taking the folder over' in took.stderr
    assert 'nothing to do' in took.stdout
    assert not os.path.exists(tmp_path / 'logs/x/run.lock')
    assert not os.path.exists(tmp_path / 'logs/x/.model.pt7.99999.tmp')


def test_each_member_folder_is_locked_and_a_refused_cohort_leaves_no_folder(image_tree, tmp_path):
    fd = hold_lock(tmp_path / 'logs/c/b')
    try:
        cohort = json.dumps([{'name': 'a', 'seed': 1}, {'name': 'b', 'seed': 2}])
        r = run_in_process(cifar.main, '--depth', 10, '--epochs', 1, '--dataroot', image_tree, '--save', 'logs/c',
                           '--cohort', cohort, cwd=tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        [line] = r.stderr.strip().splitlines()
        assert line.endswith('error: logs/c/b is in use by pid 4242 on host elsewhere since 2026-01-01 00:00:00 '
                             'UTC (cifar.py --save x); wait for it to finish, or if that process is gone delete '
                             'logs/c/b/run.lock')
        assert sorted(os.listdir(tmp_path / 'logs/c')) == ['b']  # a/ was made and removed again
        assert os.listdir(tmp_path / 'logs/c/b') == ['run.lock']  # the holder's, untouched
        # The cohort's own folder is locked too: a single run cannot write into it meanwhile.
        fd2 = hold_lock(tmp_path / 'logs/d')
        try:
            r = run_in_process(cifar.main, '--depth', 10, '--epochs', 1, '--dataroot', image_tree,
                               '--save', 'logs/d', '--cohort', cohort, cwd=tmp_path)
            assert r.returncode == 2 and 'logs/d is in use by pid 4242' in r.stderr
            assert os.listdir(tmp_path / 'logs/d') == ['run.lock']
        finally:
            os.close(fd2)
    finally:
        os.close(fd)


def test_a_command_that_fails_before_training_removes_the_folders_it_made(image_tree, tmp_path):
    os.makedirs(tmp_path / 'logs/t')
    (tmp_path / 'logs/t/log.txt').write_text('json_stats: {"depth": 10, "width": 1}\n')
    (tmp_path / 'logs/t/model.pt7').write_text('json_stats: {"depth": 10, "width": 1}\n')
    r = run_in_process(cifar.main, '--depth', 10, '--epochs', 1, '--dataroot', image_tree, '--teacher_id', 't',
                       '--save', 'logs/new/x', cwd=tmp_path)
    assert r.returncode == 2 and 'logs/t/model.pt7: it is a text file, not a model.pt7 checkpoint' in r.stderr
    assert sorted(os.listdir(tmp_path / 'logs')) == ['t']


def test_taking_a_folder_clears_interrupted_writes_only(tmp_path):
    for name in ('.model.pt7.123.tmp', 'model.pt7', 'notes.tmp', 'log.txt'):
        (tmp_path / name).write_text('x')
    try:
        lock_run_dir(str(tmp_path))
        assert sorted(os.listdir(tmp_path)) == ['log.txt', 'model.pt7', 'notes.tmp', 'run.lock']
        assert json.loads((tmp_path / 'run.lock').read_text())['pid'] == os.getpid()
    finally:
        release_run_dirs()
    assert sorted(os.listdir(tmp_path)) == ['log.txt', 'model.pt7', 'notes.tmp']


def test_under_torchrun_rank_0_locks_and_a_refusal_ends_every_rank(image_tree, tmp_path):
    from test_runs_survive import torchrun
    fd = hold_lock(tmp_path / 'logs/t')
    try:
        proc = torchrun('--standalone', '--nproc_per_node', '2', cwd=tmp_path,
                        args=['--depth', 10, '--epochs', 1, '--dataroot', image_tree, '--save', 'logs/t'])
        out, err = proc.communicate(timeout=300)
        # torchrun adds its own report of the failed children; ours is the one line from rank 0
        assert proc.returncode != 0 and err.count('cifar.py: error: logs/t is in use by pid 4242') == 1, err[-3000:]
        assert 'exitcode  : 2' in err and 'test_acc' not in out
        assert os.listdir(tmp_path / 'logs/t') == ['run.lock']
    finally:
        os.close(fd)

"""What a new user meets in the first hour, and what a hostile one tries: a resumed run's log
is exact and its options are the checkpoint's, bad input and signals end in one line, output
to a file is plain text, and a first look trains on a subset with one flag."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import cifar
import imagenet
import summarize
from conftest import ROOT, make_image_tree, run_cli, run_in_process
from test_cifar import checkpoint, expect_user_error, log_lines, ok
from test_stages import RUN, stop_at

# What two runs of the same training differ in: their times, folders, and whether they resumed.
TIMES = ('train_time', 'test_time', 'save', 'resume')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """Data (40 training images, 20 test), and a WRN-10-0.5 teacher in logs/teacher."""
    d = tmp_path_factory.mktemp('first_hour')
    make_image_tree(str(d / 'data'), n_train=40, n_test=20)
    ok(run_in_process(cifar.main, *RUN, '--dataroot', 'data', '--epochs', 1, '--seed', 1, '--save', 'logs/teacher',
                      cwd=d))
    return d


def without_times(lines):
    return [json.dumps({k: v for k, v in line.items() if k not in TIMES}) for line in lines]


# ----------------------------------------------------------------------------------------------
# Resumed runs: their log lines are an uninterrupted run's, their options the checkpoint's

def test_the_epoch_a_run_resumes_in_logs_the_line_of_an_uninterrupted_run(workdir):
    """Stopped in the middle of epoch 2 and resumed, a run logs for epoch 2 what an uninterrupted
    run logs, times aside: every step of the epoch in its meters, not only those after the resume."""
    common = [*RUN, '--dataroot', 'data', '--epochs', 3, '--seed', 2, '--teacher_id', 'teacher', '--beta', 1e3,
              '--alpha', 0.9]
    ok(run_in_process(cifar.main, *common, '--save', 'logs/straight', cwd=workdir))
    stopped = run_in_process(stop_at(cifar.main, step=4), *common, '--save', 'logs/cut', cwd=workdir)
    assert stopped.returncode == 128 + signal.SIGTERM and 'at epoch 2, step 1' in stopped.stderr, stopped.stderr
    assert checkpoint(workdir / 'logs/cut')['meters']['stage'] == 'main'
    ok(run_in_process(cifar.main, '--resume', 'logs/cut', cwd=workdir))  # the folder alone: options from it
    assert without_times(log_lines(workdir / 'logs/cut')) == without_times(log_lines(workdir / 'logs/straight'))
    a, b = checkpoint(workdir / 'logs/straight')['params'], checkpoint(workdir / 'logs/cut')['params']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_goes_on_with_the_checkpoints_options_and_refuses_other_ones(workdir):
    common = [*RUN, '--dataroot', 'data', '--seed', 3, '--teacher_id', 'teacher']
    ok(run_in_process(cifar.main, *common, '--epochs', 1, '--beta', 1e3, '--at_p', 4, '--save', 'logs/p4', cwd=workdir))
    before = sorted(os.listdir(workdir / 'logs/p4'))
    for flags, phrase in [(['--at_p', 2], '--at_p 2.0 differs from the 4.0 that logs/p4/model.pt7 was trained with'),
                          (['--lr', 0.5], '--lr 0.5 differs from the 0.1'),
                          (['--teacher_id', ''], "--teacher_id differs from the 'teacher'")]:
        r = run_in_process(cifar.main, '--resume', 'logs/p4', '--epochs', 2, *flags, cwd=workdir)
        expect_user_error(r, phrase, f'drop --{flags[0][2:]}, or start a new run')
        assert sorted(os.listdir(workdir / 'logs/p4')) == before and len(log_lines(workdir / 'logs/p4')) == 1
    # where, how fast and how long may change: more epochs, more threads
    ok(run_in_process(cifar.main, '--resume', 'logs/p4/model.pt7', '--epochs', 2, '--nthread', 1, '--at_p', 4,
                      cwd=workdir))
    lines = log_lines(workdir / 'logs/p4')
    assert [(r['epoch'], r['at_p'], r['beta'], r['seed'], r['nthread']) for r in lines] == [(1, 4, 1e3, 3, 2),
                                                                                           (2, 4, 1e3, 3, 1)]


def test_a_cohort_resumes_from_its_folder_alone_and_refuses_a_member_with_other_options(workdir):
    members = [{'name': 'at', 'seed': 4, 'beta': 1e3}, {'name': 'kd', 'seed': 5, 'alpha': 0.9}]
    common = [*RUN, '--dataroot', 'data', '--teacher_id', 'teacher', '--save', 'logs/row']
    ok(run_in_process(cifar.main, *common, '--epochs', 1, '--cohort', json.dumps(members), cwd=workdir))
    assert json.loads((workdir / 'logs/row/members.json').read_text()) == members
    changed = [members[0], {**members[1], 'alpha': 0.5}]
    expect_user_error(run_in_process(cifar.main, '--resume', 'logs/row', '--epochs', 2, '--cohort',
                                     json.dumps(changed), cwd=workdir),
                      "--cohort member 'kd': --alpha 0.5 differs from the 0.9 that logs/row/kd/model.pt7")
    ok(run_in_process(cifar.main, '--resume', 'logs/row', '--epochs', 2, cwd=workdir))
    assert [r['epoch'] for r in log_lines(workdir / 'logs/row/kd')] == [1, 2]
    assert log_lines(workdir / 'logs/row/kd')[-1]['alpha'] == 0.9
    assert log_lines(workdir / 'logs/row/at')[-1]['beta'] == 1e3


# ----------------------------------------------------------------------------------------------
# Hostile input: one line, exit code 2, nothing written

def fifo_in_a_class(root):
    make_image_tree(str(root / 'fifo'), n_train=20, n_test=10)
    os.mkfifo(root / 'fifo/train/class3/pipe.jpg')
    return ['--dataroot', 'fifo']


def wide_imagenet(root):
    for split in ('train', 'val'):
        for c in range(2):
            os.makedirs(root / f'inet16/{split}/n{c}', exist_ok=True)
            Image.fromarray(np.full((40, 40), 60000, np.uint16)).save(root / f'inet16/{split}/n{c}/0.png')
    return ['--imagenetpath', 'inet16', '--nthread', 0, '--batch_size', 2, '--epochs', 1]


def one_class_imagenet(root):
    for split in ('train', 'val'):
        os.makedirs(root / f'inet1/{split}/n0', exist_ok=True)
        Image.new('RGB', (40, 40)).save(root / f'inet1/{split}/n0/0.png')
    return ['--imagenetpath', 'inet1']


HOSTILE = [
    ('kdsvd_k above the groups', cifar.main,
     lambda root: ['--teacher_id', 'teacher', '--kdsvd_beta', 1, '--kdsvd_k', 30],
     ["--kdsvd_k 30 searches the student's first 33 singular vectors", 'use --kdsvd_k']),
    ('a member named run.lock', cifar.main, lambda root: ['--cohort', '[{"name": "run.lock"}]'],
     ["member name 'run.lock' is a file the cohort's folder holds itself"]),
    ('a pipe named *.jpg', cifar.main, fifo_in_a_class, ['pipe.jpg is not a regular file', 'remove it']),
    ('a 16-bit PNG for ImageNet', imagenet.main, wide_imagenet, ['samples, which RGB would clip to 8 bits']),
    ('ImageNet of one class', imagenet.main, one_class_imagenet, ['has one class folder (n0)', 'two classes or more']),
    ('subset too small for CRD', cifar.main,
     lambda root: ['--teacher_id', 'teacher', '--crd_beta', 0.8, '--train_per_class', 2],
     ['--crd_nce_k 16384 asks for more negatives per image than the 20 training images', '--crd_nce_k 19']),
]


@pytest.mark.parametrize('name, main, setup, phrases', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_one_line_and_writes_nothing(workdir, name, main, setup, phrases):
    flags = setup(workdir)
    data = [] if '--imagenetpath' in flags else ['--dataroot', 'data']
    common = RUN if main is cifar.main else ['--depth', 18, '--width', 0.125, '--tensorboard', 'off']
    r = run_in_process(main, *common, *data, '--epochs', 1, '--save', 'logs/hostile', *flags, cwd=workdir)
    expect_user_error(r, *phrases)
    assert not os.path.exists(workdir / 'logs/hostile')


def test_a_gpu_asked_for_where_none_is_visible_is_refused(workdir, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)  # --gpu_id sets it; put back after the test
    r = run_in_process(cifar.main, *RUN, '--dataroot', 'data', '--epochs', 1, '--gpu_id', 0, '--save', 'logs/gpu',
                       cwd=workdir)
    expect_user_error(r, '--gpu_id 0 names a GPU, and no CUDA device is visible', 'drop --gpu_id')
    assert not os.path.exists(workdir / 'logs/gpu')


def test_a_run_that_diverges_before_its_first_checkpoint_says_to_start_again(workdir):
    r = run_in_process(cifar.main, *RUN, '--dataroot', 'data', '--epochs', 1, '--teacher_id', 'teacher',
                       '--beta', 1e300, '--save', 'logs/diverged', cwd=workdir)
    assert r.returncode == 1 and 'no checkpoint was written yet' in r.stderr, r.stderr
    assert 'start the run again' in r.stderr and 'resume' not in r.stderr, r.stderr


def test_a_teacher_whose_only_log_line_was_cut_short_still_teaches(workdir):
    """Its checkpoint keeps the line the kill cut short."""
    os.makedirs(workdir / 'logs/torn', exist_ok=True)
    (workdir / 'logs/torn/model.pt7').write_bytes((workdir / 'logs/teacher/model.pt7').read_bytes())
    line = (workdir / 'logs/teacher/log.txt').read_text()
    (workdir / 'logs/torn/log.txt').write_text(line[:len(line) // 2])
    ok(run_in_process(cifar.main, *RUN, '--dataroot', 'data', '--epochs', 1, '--teacher_id', 'torn', '--beta', 1e3,
                      '--save', 'logs/from_torn', cwd=workdir))


# ----------------------------------------------------------------------------------------------
# Signals: one line, the run folder released

def start(args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'cifar.py'), *map(str, args)], cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_twice_while_starting_is_one_line(workdir):
    proc = start([*RUN, '--dataroot', 'data', '--save', 'logs/ctrl_c'], workdir)
    time.sleep(0.5)  # the libraries are loading (or, on a fast machine, the command has begun)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines() in (['cifar.py: stopped by SIGINT while starting; nothing was written'],
                                        ['cifar.py: stopped by SIGINT before training began; nothing was written'])


@pytest.fixture(scope='module')
def many(workdir):
    make_image_tree(str(workdir / 'many'), n_train=3000, n_test=10)  # seconds of decoding on one thread
    return 'many'


@pytest.mark.parametrize('name, times, gap', [('SIGTERM', 1, 0), ('SIGINT', 2, 0.02), ('SIGINT', 2, 0.3)])
def test_a_signal_while_decoding_is_one_line(workdir, many, name, times, gap):
    """Once the command has claimed its run folder and decodes the images: one line, whatever the
    number of signals, and after a single one the folder released and removed. A second signal
    0.3 s later lands while the interpreter tears down (torch takes that long), where Python has
    set the signals back to their default action."""
    save = f'logs/decoding_{name}_{times}_{gap}'
    proc = start([*RUN, '--dataroot', many, '--nthread', 1, '--save', save], workdir)
    deadline = time.time() + 60
    while not (workdir / save / 'run.lock').exists():  # claimed: decoding begins
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)
    for _ in range(times):
        proc.send_signal(getattr(signal, name))
        time.sleep(gap)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, name), err
    assert err.strip().splitlines() == [f'cifar.py: stopped by {name} before training began; nothing was written']
    if times == 1:
        assert not os.path.exists(workdir / save)  # unlocked, and the folder it made removed


# ----------------------------------------------------------------------------------------------
# The first hour: plain output, a one-line summary of the networks, a subset, the cores

def test_output_to_a_file_is_plain_lines_and_the_networks_one_line(workdir):
    r = ok(run_cli('cifar.py', *RUN, '--dataroot', 'data', '--epochs', 1, '--teacher_id', 'teacher', '--beta', 1e3,
                   '--save', 'logs/plain', cwd=workdir))
    assert '\x1b[' not in r.stdout + r.stderr and '\r' not in r.stdout + r.stderr  # no colour, no progress bar
    lines = r.stdout.splitlines()
    assert [line.split(':')[0] for line in lines[:2]] == ['parsed options', 'Parameters']
    assert lines[1].startswith('Parameters: student ') and ', teacher ' in lines[1] and len(lines) == 3
    table = ok(run_cli('cifar.py', *RUN, '--dataroot', 'data', '--epochs', 1, '--param_table', '--save',
                       'logs/table', cwd=workdir)).stdout
    assert 'group0.block0.conv0' in table and 'Total number of parameters' in table


def test_a_first_look_trains_on_the_first_images_of_each_class(workdir):
    ok(run_in_process(cifar.main, *RUN, '--dataroot', 'data', '--epochs', 1, '--train_per_class', 3,
                      '--test_per_class', 1, '--save', 'logs/subset', cwd=workdir))
    line = log_lines(workdir / 'logs/subset')[0]
    assert (line['n_train'], line['n_test'], line['train_per_class']) == (30, 10, 3)
    groups = summarize.group_runs([summarize.describe_run('x', [line])])
    assert summarize.data_name(groups[0][0]['options']) == 'CIFAR10 (3 train, 1 test images/class)'


def test_decoding_threads_default_to_the_cores_this_process_may_use():
    assert cifar.parse_args(['--save', 'x']).nthread == len(os.sched_getaffinity(0))
    assert imagenet.parse_args(['--save', 'x', '--imagenetpath', 'x']).nthread == len(os.sched_getaffinity(0))


def test_an_error_before_training_is_the_only_line(workdir, monkeypatch):
    """Offline, the first set-up command cannot download CIFAR: the error is all it prints."""
    import torchvision

    def offline(*args, **kwargs):
        raise OSError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    os.makedirs(workdir / 'empty', exist_ok=True)
    r = run_in_process(cifar.main, '--dataroot', 'empty', '--save', 'logs/offline', '--depth', 16, '--width', 2,
                       cwd=workdir)
    expect_user_error(r, 'CIFAR10 not found in', 'the download failed (OSError)')
    assert r.stdout == ''


# ----------------------------------------------------------------------------------------------
# summarize.py on what is not a log of this suite, and on a diverged run

def test_summarize_names_logs_that_are_not_this_suites_and_leaves_out_diverged_runs(workdir, monkeypatch, capsys):
    good = log_lines(workdir / 'logs/teacher')[0]
    files = {'empty': b'', 'other': b'epoch 1 loss 2.3\n', 'jsonl': b'{"epoch": 1, "test_acc": 50}\n',
             'binary': bytes(range(256)), 'nan': ('json_stats: ' + json.dumps({**good, 'test_acc': float('nan')})
                                                  + '\n').encode(),
             'good': ('json_stats: ' + json.dumps(good) + '\n').encode()}
    for name, content in files.items():
        os.makedirs(workdir / 'sum' / name, exist_ok=True)
        (workdir / 'sum' / name / 'log.txt').write_bytes(content)
    monkeypatch.chdir(workdir)
    summarize.main(['sum'])
    out, err = capsys.readouterr()
    assert out.count('| WRN-10-0.5 |') == 1
    for name, phrase in [('empty', 'is empty: not a log of this suite'), ('other', "has no 'json_stats:' line"),
                         ('jsonl', "its lines are JSON without the 'json_stats:' prefix"),
                         ('binary', 'is a binary file'), ('nan', 'its test accuracy is NaN at epoch 1')]:
        assert any(f'sum/{name}' in line and phrase in line and line.endswith('left out') for line in
                   err.splitlines()), (name, err)

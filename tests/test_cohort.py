"""Cohorts through cifar.py: members equal to single runs, each an ordinary run on disk, and a
cohort that survives interruption, divergence of a member, and bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import cifar
from conftest import ROOT, make_image_tree, run_cli, run_in_process
from test_cifar import TINY, checkpoint, expect_user_error, fingerprint, log_lines, ok
from test_runs_survive import epochs_logged, start, wait_for_log_lines

STUDENT = [*TINY, '--width', 0.5, '--epoch_step', '[2]', '--teacher_id', 'teacher']
# student alone, AT, KD (at a learning rate of its own), AT+KD with decaying beta, F-ActT: each from its own seed
MEMBERS = [{'name': 'student', 'seed': 11}, {'name': 'at', 'seed': 12, 'beta': 1e3},
           {'name': 'kd', 'seed': 13, 'alpha': 0.9, 'temperature': 2, 'lr': 0.03},
           {'name': 'at_kd', 'seed': 14, 'alpha': 0.9, 'beta': 1e3, 'beta_decay': 0.5},
           {'name': 'factt', 'seed': 15, 'factt_beta': 0.5}]


def flags_of(member):
    return [f for k, v in member.items() if k != 'name' for f in (f'--{k}', v)]


@pytest.fixture(scope='module')
def workdir(image_tree, tmp_path_factory):
    """A directory with a trained teacher in logs/teacher (WRN-10-1, one epoch)."""
    d = tmp_path_factory.mktemp('cohort')
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--seed', 1, '--dataroot', image_tree,
               '--save', 'logs/teacher', cwd=d))
    return d


def test_each_member_equals_the_single_run_with_its_options(image_tree, workdir):
    """In float64 on the reference path a member's parameters after two epochs are those of a
    single run with its options, its --seed and the cohort's --data_seed."""
    common = [*STUDENT, '--epochs', 2, '--dataroot', image_tree, '--dtype', 'double', '--reference']
    out = ok(run_cli('cifar.py', *common, '--save', 'logs/row', '--cohort', json.dumps(MEMBERS), cwd=workdir))
    assert out.stdout.count(', test_acc') == 2 * len(MEMBERS)
    for member in MEMBERS:
        name = member['name']
        ok(run_in_process(cifar.main, *common, *flags_of(member), '--data_seed', 11, '--save',
                          f'logs/single/{name}', cwd=workdir))
        a = checkpoint(workdir / 'logs/row' / name)
        b = checkpoint(workdir / 'logs/single' / name)
        assert a.keys() == b.keys() and a['params'].keys() == b['params'].keys()
        for k in a['params']:
            torch.testing.assert_close(a['params'][k], b['params'][k], rtol=1e-9, atol=1e-12, msg=f'{name}: {k}')
        lines, single = log_lines(workdir / 'logs/row' / name), log_lines(workdir / 'logs/single' / name)
        assert len(lines) == 2 and lines[0].keys() == single[0].keys()
        for line, expected in zip(lines, single):
            assert line['save'] == f'logs/row/{name}' and line['cohort'] == 'logs/row'
            assert line['seed'] == member['seed'] and line['data_seed'] == 11
            for key, value in expected.items():
                if key in ('save', 'cohort', 'train_time', 'test_time'):
                    continue
                if key.endswith('_loss') or key.endswith('_losses') or key.endswith('_acc'):
                    assert json.dumps(line[key]) == json.dumps(value) or \
                        torch.allclose(torch.tensor(line[key], dtype=torch.float64),
                                       torch.tensor(value, dtype=torch.float64), rtol=1e-6), (name, key)
                else:
                    assert line[key] == value, (name, key)
    assert log_lines(workdir / 'logs/row/at_kd')[1]['loss_weights']['at'] == 500  # beta decayed at epoch 2


def test_a_member_is_an_ordinary_run(image_tree, workdir):
    """It resumes alone, teaches, and summarize.py reads the cohort as runs."""
    members = [{'name': 'at', 'seed': 3, 'beta': 1e3}, {'name': 'alone', 'seed': 4}]
    common = [*STUDENT, '--dataroot', image_tree]
    ok(run_cli('cifar.py', *common, '--epochs', 1, '--save', 'logs/pair', '--cohort', json.dumps(members),
               cwd=workdir))
    ok(run_in_process(cifar.main, *common, '--epochs', 2, '--seed', 3, '--beta', 1e3, '--save', 'logs/pair/at',
                      '--resume', 'logs/pair/at/model.pt7', cwd=workdir))
    assert epochs_logged(workdir / 'logs/pair/at') == [1, 2]
    ok(run_in_process(cifar.main, *TINY, '--width', 0.5, '--epochs', 1, '--dataroot', image_tree,
                      '--teacher_id', 'pair/at', '--beta', 1e3, '--save', 'logs/taught', cwd=workdir))
    table = subprocess.run([sys.executable, os.path.join(ROOT, 'summarize.py'), 'logs/pair'], cwd=workdir,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert table.returncode == 0, table.stderr
    assert table.stdout.count('\n| WRN-10-0.5 |') == 2, table.stdout


def test_resumed_cohort_equals_an_uninterrupted_one_and_survives_signals(image_tree, workdir):
    members = json.dumps([{'name': 'at', 'seed': 5, 'beta': 1e3}, {'name': 'kd', 'seed': 6, 'alpha': 0.9}])
    common = [*STUDENT, '--batch_size', 4, '--epochs', 3, '--dataroot', image_tree, '--deterministic',
              '--precision', 'fp32', '--cohort', members]
    ok(run_cli('cifar.py', *common, '--save', 'logs/straight', cwd=workdir))
    proc = start([*common, '--save', 'logs/stopped'], workdir)
    wait_for_log_lines(workdir / 'logs/stopped/kd', 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'every member checkpointed: resume with --resume logs/stopped' in err
    iterations = {checkpoint(workdir / 'logs/stopped' / m)['iteration'] for m in ('at', 'kd')}
    assert len(iterations) == 1  # every member stopped after the same step
    # kill -9 between epochs leaves every member loadable, with every log line backed
    proc = start([*common, '--save', 'logs/stopped', '--resume', 'logs/stopped'], workdir)
    wait_for_log_lines(workdir / 'logs/stopped/kd', 2, proc)
    proc.kill()
    proc.communicate()
    for m in ('at', 'kd'):
        assert checkpoint(workdir / 'logs/stopped' / m)['epoch'] >= len(epochs_logged(workdir / 'logs/stopped' / m))
    ok(run_cli('cifar.py', *common, '--save', 'logs/stopped', '--resume', 'logs/stopped', cwd=workdir))
    for m in ('at', 'kd'):
        assert epochs_logged(workdir / 'logs/stopped' / m) == [1, 2, 3]
        a, b = checkpoint(workdir / 'logs/straight' / m)['params'], checkpoint(workdir / 'logs/stopped' / m)['params']
        for k in a:
            assert torch.equal(a[k], b[k]), (m, k)


def test_a_diverging_member_stops_alone(image_tree, workdir):
    """A member whose loss is no longer finite stops at its last good checkpoint, named; the
    others finish, and the command exits 1."""
    # from epoch 2 on the bad member's AT weight is 1e300: its gradients overflow
    members = [{'name': 'good', 'seed': 1, 'beta': 1e3}, {'name': 'bad', 'seed': 2, 'beta': 1e3, 'beta_decay': 1e297}]
    common = [*STUDENT, '--dataroot', image_tree, '--save', 'logs/div', '--epoch_step', '[2]']
    ok(run_cli('cifar.py', *common, '--epochs', 1, '--cohort', json.dumps(members), cwd=workdir))
    before = fingerprint(workdir / 'logs/div/bad')
    r = run_cli('cifar.py', *common, '--epochs', 3, '--resume', 'logs/div', '--cohort', json.dumps(members),
                cwd=workdir)
    assert r.returncode == 1, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and "cohort member bad: training diverged at epoch 2" in r.stderr
    assert 'the last good checkpoint is logs/div/bad/model.pt7' in r.stderr
    assert '1 of 2 members of the cohort logs/div stopped early' in r.stderr.strip().splitlines()[-1]
    assert fingerprint(workdir / 'logs/div/bad') == before
    assert epochs_logged(workdir / 'logs/div/good') == [1, 2, 3]


def test_gradient_based_members_train_beside_the_others(image_tree, workdir):
    """Members with input-gradient terms run uncompiled beside compiled ones; the teacher's
    input gradient is computed once for all of them."""
    members = [{'name': 'grad', 'seed': 1, 'grad_beta': 1}, {'name': 'sym', 'seed': 2, 'sym_beta': 1},
               {'name': 'at', 'seed': 3, 'beta': 1e3}]
    ok(run_in_process(cifar.main, *STUDENT, '--epochs', 1, '--dataroot', image_tree, '--save', 'logs/grad',
                      '--cohort', json.dumps(members), cwd=workdir))
    assert log_lines(workdir / 'logs/grad/grad')[0]['grad_at_loss'][0] > 0
    assert log_lines(workdir / 'logs/grad/sym')[0]['symmetry_loss'][0] > 0
    assert 'grad_at_loss' not in log_lines(workdir / 'logs/grad/at')[0]


def test_bad_cohorts_are_one_line_errors_that_touch_nothing(image_tree, workdir):
    os.makedirs(workdir / 'logs/taken/a', exist_ok=True)
    shutil.copy(workdir / 'logs/teacher/log.txt', workdir / 'logs/taken/a/log.txt')
    shutil.copy(workdir / 'logs/teacher/model.pt7', workdir / 'logs/taken/a/model.pt7')
    before = fingerprint(workdir / 'logs/taken/a')
    (workdir / 'members.json').write_text('[{"name": "a"}, {"name": "b", "sed": 1}]')
    cases = [
        (['--cohort', '[{"name": "a"'], ['--cohort is not valid JSON']),
        (['--cohort', '[' * 100000 + ']' * 100000], ['--cohort nests JSON too deeply to read']),
        (['--cohort', '{"name": "a"}'], ['not a non-empty JSON list']),
        (['--cohort', '@members.json'], ["member 'b' has unknown key 'sed'"]),
        (['--cohort', '@missing.json'], ['cannot read missing.json']),
        (['--cohort', '[{"seed": 1}]'], ['member name None is not a folder name']),
        (['--cohort', '[{"name": "a"}, {"name": "a"}]'], ["names two members 'a'"]),
        (['--cohort', '[{"name": "../a"}]'], ['is not a folder name']),
        (['--cohort', '[{"name": "a", "alpha": 2}]'], ["member 'a': --alpha 2 is outside [0, 1]"]),
        # the members of a cohort train in one precision, the command line's
        (['--cohort', '[{"name": "a", "precision": "bf16"}]'], ["member 'a' has unknown key 'precision'"]),
        (['--cohort', '[{"name": "a", "factt_beta": 1}]', '--teacher_id', ''],
         ["member 'a': --factt_beta compares the student with a teacher"]),
        (['--cohort', '[{"name": "a"}]', '--save', 'logs/taken'], ['logs/taken/a already holds a run',
                                                                   '--resume logs/taken']),
        (['--cohort', '[{"name": "a"}]', '--save', 'logs/taken', '--resume', 'logs/taken/a/model.pt7'],
         ['--resume logs/taken, not --resume logs/taken/a/model.pt7']),
    ]
    for extra, phrases in cases:  # in this process: each is refused before any data is loaded
        r = run_in_process(cifar.main, *STUDENT, '--epochs', 1, '--dataroot', image_tree, '--save', 'logs/new',
                           *extra, cwd=workdir)
        expect_user_error(r, *phrases)
        assert not os.path.exists(workdir / 'logs/new') and fingerprint(workdir / 'logs/taken/a') == before


# ----------------------------------------------------------------------------------------------
# The CRD benchmark's other methods and DKD, one member each

# FSP and KDSVD compare channels one to one: WRN-10-0.5 students of a WRN-10-0.5 teacher. Each
# member changes a setting of its method too, and some combine with AT or KD. The weights are
# small enough for a barely trained teacher at --lr 0.1.
METHOD_MEMBERS = [
    {'name': 'sp', 'seed': 21, 'sp_beta': 10}, {'name': 'cc', 'seed': 22, 'cc_beta': 0.02, 'cc_dim': 16},
    {'name': 'rkd', 'seed': 23, 'rkd_beta': 1, 'rkd_w_a': 25}, {'name': 'pkt', 'seed': 24, 'pkt_beta': 100},
    {'name': 'nst_at', 'seed': 25, 'nst_beta': 5, 'beta': 1e3},
    {'name': 'kdsvd', 'seed': 26, 'kdsvd_beta': 1, 'kdsvd_k': 2},
    {'name': 'fsp', 'seed': 27, 'fsp_beta': 1, 'init_epochs': 0},  # a main-stage term (tests/test_stages.py: init)
    {'name': 'vid', 'seed': 28, 'vid_beta': 1},
    {'name': 'dkd', 'seed': 29, 'dkd_beta': 1, 'dkd_warmup': 2, 'dkd_nckd': 6, 'logit_stand': True},
    {'name': 'kd_cc', 'seed': 30, 'alpha': 0.9, 'logit_stand': True, 'cc_beta': 0.02}]
# two steps of 16 images an epoch keep ten members in float64 fast
METHOD_RUN = ['--depth', 10, '--width', 0.5, '--batch_size', 16, '--nthread', 2, '--epoch_step', '[2]',
              '--teacher_id', 'teacher_half', '--dtype', 'double', '--reference']


def member_flags(member):
    """cifar.py's flags for a member's options (a switch is its bare flag)."""
    return [f for k, v in member.items() if k != 'name' and v is not False
            for f in ((f'--{k}',) if v is True else (f'--{k}', v))]


@pytest.fixture(scope='module')
def small_tree(tmp_path_factory):
    return make_image_tree(str(tmp_path_factory.mktemp('small_tree')), n_train=32, n_test=16)


@pytest.fixture(scope='module')
def methods_dir(small_tree, tmp_path_factory):
    """A directory with a WRN-10-0.5 teacher in logs/teacher_half (one epoch)."""
    d = tmp_path_factory.mktemp('methods')
    ok(run_in_process(cifar.main, *METHOD_RUN[:8], '--epochs', 1, '--seed', 1, '--dataroot', small_tree,
                      '--save', 'logs/teacher_half', cwd=d))
    return d


@pytest.fixture(scope='module')
def methods_row(small_tree, methods_dir):
    """The cohort of the methods, trained two epochs through the command line."""
    ok(run_cli('cifar.py', *METHOD_RUN, '--epochs', 2, '--dataroot', small_tree, '--save', 'logs/methods',
               '--cohort', json.dumps(METHOD_MEMBERS), cwd=methods_dir))
    return methods_dir / 'logs/methods'


def test_each_method_member_equals_its_single_run(small_tree, methods_dir, methods_row):
    """Members with different methods and settings share batches and one teacher forward (which
    hands out its pooled feature because some of them read it), yet each ends where the single
    run with its options ends."""
    for member in METHOD_MEMBERS:
        name = member['name']
        ok(run_in_process(cifar.main, *METHOD_RUN, '--epochs', 2, '--dataroot', small_tree,
                          *member_flags(member), '--data_seed', 21, '--save', f'logs/methods_single/{name}',
                          cwd=methods_dir))
        a, b = checkpoint(methods_row / name), checkpoint(methods_dir / 'logs/methods_single' / name)
        assert a['params'].keys() == b['params'].keys()
        for k in a['params']:
            torch.testing.assert_close(a['params'][k], b['params'][k], rtol=1e-9, atol=1e-12, msg=f'{name}: {k}')
        lines, single = log_lines(methods_row / name), log_lines(methods_dir / 'logs/methods_single' / name)
        assert [r['loss_weights'] for r in lines] == [r['loss_weights'] for r in single]
        for line, expected in zip(lines, single):
            for key in expected:
                if key.endswith(('_loss', '_losses')) and key != 'at_losses':
                    torch.testing.assert_close(torch.tensor(line[key], dtype=torch.float64),
                                               torch.tensor(expected[key], dtype=torch.float64), rtol=1e-6, atol=0)
    logged = log_lines(methods_row / 'sp')[0]
    assert logged['sp_loss'][0] > 0 and 'cc_loss' not in logged
    for name, key, n in [('cc', 'cc_loss', None), ('rkd', 'rkd_loss', None), ('pkt', 'pkt_loss', None),
                         ('nst_at', 'nst_losses', 3), ('kdsvd', 'kdsvd_loss', None), ('fsp', 'fsp_loss', None),
                         ('vid', 'vid_losses', 3), ('dkd', 'dkd_loss', None), ('kd_cc', 'cc_loss', None)]:
        value = log_lines(methods_row / name)[0][key]
        assert (len(value) == n and all(m != 0 for m, _ in value)) if n else value[0] != 0, (name, key)
    assert [r['loss_weights']['dkd'] for r in log_lines(methods_row / 'dkd')] == [0.5, 1]  # warm-up of 2 epochs
    params = checkpoint(methods_row / 'cc')['params']
    assert params['aux.cc.embed_s.weight'].shape == (16, 32) and 'aux.vid0.log_scale' in checkpoint(
        methods_row / 'vid')['params']


def test_a_methods_cohort_resumes_bit_for_bit(small_tree, methods_dir, methods_row):
    """Stopped after one epoch and resumed, every member (its learned parts and DKD's warm-up
    included) ends bit for bit where the uninterrupted cohort ends."""
    common = [*METHOD_RUN, '--dataroot', small_tree, '--save', 'logs/methods_split', '--cohort',
              json.dumps(METHOD_MEMBERS)]
    ok(run_in_process(cifar.main, *common, '--epochs', 1, cwd=methods_dir))
    ok(run_in_process(cifar.main, *common, '--epochs', 2, '--resume', 'logs/methods_split', cwd=methods_dir))
    for member in METHOD_MEMBERS:
        name = member['name']
        a, b = checkpoint(methods_row / name)['params'], checkpoint(methods_dir / 'logs/methods_split' / name)['params']
        assert a.keys() == b.keys() and any(k.startswith('aux.') for k in a) == (name in ('cc', 'vid', 'kd_cc'))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        assert [r['loss_weights'] for r in log_lines(methods_dir / 'logs/methods_split' / name)] == \
            [r['loss_weights'] for r in log_lines(methods_row / name)]

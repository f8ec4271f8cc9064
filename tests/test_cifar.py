"""cifar.py through its command line, on small generated data, as a user runs it."""
import hashlib
import json
import math
import os
import shutil

import pytest
import torch

import cifar
from conftest import run_cli, run_in_process
from resnet import resnet

TINY = ['--depth', 10, '--batch_size', 32, '--nthread', 2]


def log_lines(run_dir):
    with open(os.path.join(run_dir, 'log.txt')) as f:
        return [json.loads(line[len('json_stats: '):]) for line in f]


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, 'model.pt7'), map_location='cpu', weights_only=True)


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def fingerprint(directory):
    # The run's files; its tb/ folder holds live curves (tensorboard_log.py), not its record.
    return {name: hashlib.sha256(open(os.path.join(directory, name), 'rb').read()).hexdigest()
            for name in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, name))}


@pytest.mark.parametrize('layout', ['image_tree', 'python_release'])
def test_teacher_then_at_kd_student(layout, request, tmp_path):
    data = request.getfixturevalue(layout)
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--seed', 1, '--dataroot', data,
               '--save', 'logs/teacher', cwd=tmp_path))
    teacher_log = log_lines(tmp_path / 'logs/teacher')
    assert len(teacher_log) == 1 and teacher_log[0]['at_losses'] == []
    assert teacher_log[0]['n_parameters'] == sum(p.numel() for p in resnet(10, 1, 10)[1].values())

    out = ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', 2, '--seed', 2, '--dataroot', data,
                     '--teacher_id', 'teacher', '--beta', 1e3, '--alpha', 0.9, '--save', 'logs/student',
                     cwd=tmp_path))
    assert '(2/2), test_acc' in out.stdout
    log = log_lines(tmp_path / 'logs/student')
    assert [r['epoch'] for r in log] == [1, 2]
    r = log[-1]
    for key in ('depth', 'width', 'teacher_id', 'beta', 'alpha', 'seed', 'train_loss', 'train_acc',
                'test_loss', 'test_acc', 'num_classes', 'n_parameters', 'train_time', 'test_time'):
        assert key in r, key
    assert r['n_parameters'] == sum(p.numel() for p in resnet(10, 0.5, 10)[1].values())
    assert r['num_classes'] == 10 and 0 <= r['test_acc'] <= 100 and math.isfinite(r['train_loss'])
    assert len(r['at_losses']) == 3
    for mean, std in r['at_losses']:
        assert mean > 0 and std > 0 and math.isfinite(mean)

    ckpt = checkpoint(tmp_path / 'logs/student')
    assert ckpt['epoch'] == 2 and {'params', 'optimizer', 'epoch'} <= set(ckpt)
    assert ckpt['options']['teacher_id'] == 'teacher' and ckpt['iteration'] == 2 * 4
    teacher = checkpoint(tmp_path / 'logs/teacher')['params']
    for k, v in teacher.items():  # the teacher is used, never trained (BN statistics included)
        assert torch.equal(ckpt['params']['teacher.' + k], v), k
    _, fresh = resnet(10, 0.5, 10)
    assert set(ckpt['params']) == {'student.' + k for k in fresh} | {'teacher.' + k for k in teacher}


def test_resume_continues_epochs_and_log_and_matches_a_straight_run(image_tree, tmp_path):
    # --deterministic: on a GPU, bitwise equality needs deterministic kernels (no effect on CPU).
    # bf16 autocast, emulated where the CPU has no bf16 units: the resume is bitwise there too.
    common = [*TINY, '--width', 1, '--epochs', 3, '--epoch_step', '[2]', '--seed', 3, '--dataroot', image_tree,
              '--deterministic', '--precision', 'bf16']
    ok(run_cli('cifar.py', *common, '--save', 'logs/straight', cwd=tmp_path))
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--epoch_step', '[2]', '--seed', 3,
               '--dataroot', image_tree, '--deterministic', '--precision', 'bf16', '--save', 'logs/split',
               cwd=tmp_path))
    out = ok(run_cli('cifar.py', *common, '--save', 'logs/split', '--resume', 'logs/split/model.pt7',
                     cwd=tmp_path))
    assert '(1/3)' not in out.stdout and '(3/3)' in out.stdout
    assert [r['epoch'] for r in log_lines(tmp_path / 'logs/split')] == [1, 2, 3]
    a, b = checkpoint(tmp_path / 'logs/straight'), checkpoint(tmp_path / 'logs/split')
    assert b['epoch'] == 3
    for k in a['params']:  # same seed: the continuation is bitwise the uninterrupted run
        assert torch.equal(a['params'][k], b['params'][k]), k
    # resuming a finished run does nothing and says so
    out = ok(run_cli('cifar.py', *common, '--save', 'logs/split', '--resume', 'logs/split/model.pt7',
                     cwd=tmp_path))
    assert 'nothing to do' in out.stdout and len(log_lines(tmp_path / 'logs/split')) == 3


def write_reference_run(run_dir, depth, width, legacy_stats):
    """A run directory as the reference code leaves it: first log line with its options,
    model.pt7 with params (and, in its 2017 layout, BN statistics under 'stats')."""
    os.makedirs(run_dir)
    torch.manual_seed(5)
    _, params = resnet(depth, width, 10)
    opt = torch.optim.SGD([v for v in params.values() if v.requires_grad], 0.02, momentum=0.9,
                          weight_decay=5e-4)
    sum(v.sum() for v in params.values() if v.requires_grad).backward()
    opt.step()
    tensors = {k: v.detach().clone() for k, v in params.items()}
    state = {'params': tensors, 'optimizer': opt.state_dict(), 'epoch': 4}
    if legacy_stats:
        state['params'] = {k: v for k, v in tensors.items() if 'running' not in k}
        state['stats'] = {k: v for k, v in tensors.items() if 'running' in k}
    torch.save(state, os.path.join(run_dir, 'model.pt7'), _use_new_zipfile_serialization=False)
    line = {'depth': depth, 'width': width, 'dataset': 'CIFAR10', 'epoch': 4, 'test_acc': 50.0,
            'num_classes': 10, 'at_losses': [[float('nan'), float('nan')]] * 3}
    with open(os.path.join(run_dir, 'log.txt'), 'w') as f:
        f.write('json_stats: ' + json.dumps(line) + '\n')
    return tensors


def test_reference_checkpoints_work_as_teacher_and_as_resume_file(image_tree, tmp_path):
    teacher = write_reference_run(tmp_path / 'logs/ref_teacher', 10, 1, legacy_stats=True)
    ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', 1, '--dataroot', image_tree,
               '--teacher_id', 'ref_teacher', '--beta', 1e3, '--save', 'logs/s', cwd=tmp_path))
    params = checkpoint(tmp_path / 'logs/s')['params']
    for k, v in teacher.items():
        assert torch.equal(params['teacher.' + k], v), k

    write_reference_run(tmp_path / 'old', 10, 1, legacy_stats=False)
    out = ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 5, '--dataroot', image_tree,
                     '--resume', 'old/model.pt7', '--save', 'logs/continued', cwd=tmp_path))
    assert '(5/5)' in out.stdout and '(4/5)' not in out.stdout
    assert [r['epoch'] for r in log_lines(tmp_path / 'logs/continued')] == [5]


def expect_user_error(result, *phrases):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and 'Traceback' not in result.stderr, result.stderr
    for p in phrases:
        assert p in err[0], err[0]


def test_bad_input_is_one_line_exit_2_and_changes_nothing(image_tree, tmp_path):
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--dataroot', image_tree,
               '--save', 'logs/run', cwd=tmp_path))
    before = fingerprint(tmp_path / 'logs/run')
    cases = [
        (['--depth', 18, '--save', 'logs/x'], ['--depth 18 is not 6n+4']),
        (['--width', 0, '--save', 'logs/x'], ['--width 0']),
        (['--epoch_step', '60,120', '--save', 'logs/x'], ['--epoch_step']),
        (['--teacher_id', 'nope', '--save', 'logs/x'], ['teacher logs/nope does not exist']),
        (['--dataroot', tmp_path / 'no_data', '--save', 'logs/x'], ['CIFAR10 not found in', '--dataroot']),
        (['--save', 'logs/run'], ['logs/run already holds a run', '--resume']),
        (['--save', 'logs/run', '--resume', 'logs/run/log.txt'], ['cannot read checkpoint']),
        (['--save', 'logs/run', '--resume', 'logs/run/model.pt7', '--width', 2],
         ['--width 2.0 differs from the 1.0 that logs/run/model.pt7 was trained with']),
        (['--teacher_id', 'bad_log', '--save', 'logs/x'], ['logs/bad_log/log.txt:1 is not a valid json_stats line']),
        (['--teacher_id', 'bad_ckpt', '--save', 'logs/x'], ['cannot read checkpoint logs/bad_ckpt/model.pt7']),
    ]
    os.makedirs(tmp_path / 'logs/bad_log')
    (tmp_path / 'logs/bad_log/log.txt').write_text('json_stats: {"depth": 10, \n')
    os.makedirs(tmp_path / 'logs/bad_ckpt')
    (tmp_path / 'logs/bad_ckpt/log.txt').write_text('json_stats: {"depth": 10, "width": 1}\n')
    (tmp_path / 'logs/bad_ckpt/model.pt7').write_bytes(b'\x00' * 100)
    for n, (extra, phrases) in enumerate(cases):
        args = [*TINY, '--epochs', 2, '--dataroot', image_tree, *extra]
        # one through the command line, the rest in this process (no imports to pay for)
        run = run_cli('cifar.py', *args, cwd=tmp_path) if n == 0 else run_in_process(cifar.main, *args, cwd=tmp_path)
        expect_user_error(run, *phrases)
        assert fingerprint(tmp_path / 'logs/run') == before
        assert not os.path.exists(tmp_path / 'logs/x')


def test_teacher_trained_on_other_classes_is_refused(image_tree, tmp_path):
    run = tmp_path / 'logs/c100'
    write_reference_run(run, 10, 1, legacy_stats=False)
    line = json.loads((run / 'log.txt').read_text()[12:])
    line['num_classes'] = 100
    (run / 'log.txt').write_text('json_stats: ' + json.dumps(line) + '\n')
    expect_user_error(run_cli('cifar.py', *TINY, '--epochs', 1, '--dataroot', image_tree, '--teacher_id', 'c100',
                              '--save', 'logs/y', cwd=tmp_path), 'trained on 100 classes')


def write_original_checkpoint(path, depth, width, epoch):
    """A model.pt7 as the original code writes it mid-training: NCHW parameters and an SGD state
    whose momentum buffers are all different (so a buffer read in the wrong order shows)."""
    torch.manual_seed(6)
    _, params = resnet(depth, width, 10)
    opt = torch.optim.SGD([v for v in params.values() if v.requires_grad], 0.1, momentum=0.9, weight_decay=5e-4)
    for v in params.values():
        if v.requires_grad:
            v.grad = 0.01 * torch.randn_like(v)  # the size of a late-training gradient
    opt.step()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'params': {k: v.detach() for k, v in params.items()}, 'optimizer': opt.state_dict(),
                'epoch': epoch}, path)


def test_nchw_checkpoints_resume_on_the_fast_path_as_on_the_reference_path(image_tree, tmp_path):
    """A --reference run's checkpoint and one of the original code both hold NCHW momentum
    buffers; resumed on the fast path (channels_last, fused SGD) the run must continue as the
    reference path continues it (before the buffers took the layout of their parameters, 0.36 apart).
    The fast path trains in fp32 here: under bf16 autocast it ends 6e-3 away from fp32."""
    common = [*TINY, '--width', 1, '--seed', 3, '--dataroot', image_tree, '--epoch_step', '[9]',
              '--precision', 'fp32']
    ok(run_cli('cifar.py', *common, '--epochs', 1, '--reference', '--save', 'logs/ref', cwd=tmp_path))
    write_original_checkpoint(tmp_path / 'old/model.pt7', 10, 1, epoch=1)
    for source in ('logs/ref/model.pt7', 'old/model.pt7'):
        ends = []
        for path in ([], ['--reference']):
            save = f'logs/{len(ends)}-{source.split("/")[0]}'
            ok(run_in_process(cifar.main, *common, '--epochs', 2, *path, '--resume', source, '--save', save,
                              cwd=tmp_path))
            ends.append(checkpoint(tmp_path / save)['params'])
        gap = max((ends[0][k] - ends[1][k]).abs().max().item() for k in ends[0])
        assert gap < 1e-3, (source, gap)


def test_each_log_line_says_the_precision_it_trained_in(image_tree, tmp_path, monkeypatch):
    """--precision auto follows the hardware (AT_CPU_BF16 plays the other kind of CPU), bf16
    without bf16 units trains and says once that it is emulated, a resume may change the
    precision, and summarize.py keeps runs that differ only in it in one row."""
    import summarize
    common = [*TINY, '--width', 1, '--seed', 3, '--dataroot', image_tree]
    monkeypatch.setenv('AT_CPU_BF16', '0')
    out = ok(run_in_process(cifar.main, *common, '--epochs', 1, '--precision', 'bf16', '--save', 'logs/p',
                            cwd=tmp_path)).stdout
    assert out.count('--precision bf16: this CPU (no AVX512-BF16 or AMX) has no bf16 units') == 1, out
    out = ok(run_in_process(cifar.main, *common, '--epochs', 2, '--precision', 'fp32', '--resume', 'logs/p/model.pt7',
                            '--save', 'logs/p', cwd=tmp_path)).stdout
    assert 'has no bf16 units' not in out
    assert [(r['precision'], r['autocast']) for r in log_lines(tmp_path / 'logs/p')] == [('bf16', 'bf16'),
                                                                                        ('fp32', 'off')]
    for has_bf16, autocast in (('0', 'off'), ('1', 'bf16')):
        monkeypatch.setenv('AT_CPU_BF16', has_bf16)
        out = ok(run_in_process(cifar.main, *common, '--epochs', 1, '--save', f'logs/auto/{has_bf16}',
                                cwd=tmp_path)).stdout
        assert 'has no bf16 units' not in out
        [line] = log_lines(tmp_path / f'logs/auto/{has_bf16}')
        assert line['precision'] == 'auto' and line['autocast'] == autocast
    table = ok(run_in_process(summarize.main, 'logs/auto', cwd=tmp_path)).stdout
    assert table.count('\n| WRN-10-1 | - | - | CIFAR10 | 2 |') == 1, table


def test_non_finite_teachers_and_resume_files_are_refused_and_each_line_counts_the_images(image_tree, tmp_path):
    """A NaN in a teacher or a resumed state read as the student diverging ('lower --lr and
    resume'); it is the file that is wrong. The run that does train logs the images it used."""
    write_reference_run(tmp_path / 'logs/nan_teacher', 10, 1, legacy_stats=True)
    state = torch.load(tmp_path / 'logs/nan_teacher/model.pt7', weights_only=True)
    state['stats']['group1.block0.bn0.running_var'][2] = float('nan')
    torch.save(state, tmp_path / 'logs/nan_teacher/model.pt7')
    write_reference_run(tmp_path / 'old', 10, 1, legacy_stats=False)
    state = torch.load(tmp_path / 'old/model.pt7', weights_only=True)
    trainable = [k for k, v in resnet(10, 1, 10)[1].items() if v.requires_grad]
    state['optimizer']['state'][2]['momentum_buffer'].view(-1)[0] = float('inf')
    torch.save(state, tmp_path / 'old/momentum.pt7')
    state['params']['fc.bias'][0] = float('nan')
    torch.save(state, tmp_path / 'old/params.pt7')
    common = [*TINY, '--epochs', 5, '--dataroot', image_tree]
    for extra, phrase in [
            (['--teacher_id', 'nan_teacher', '--save', 'logs/x'],
             'teacher logs/nan_teacher/model.pt7: group1.block0.bn0.running_var holds NaN values; retrain the teacher'),
            (['--resume', 'old/momentum.pt7', '--save', 'logs/y'],
             f'old/momentum.pt7: the momentum of {trainable[2]} holds Inf values; resume from an earlier checkpoint'),
            (['--resume', 'old/params.pt7', '--save', 'logs/z'], 'old/params.pt7: fc.bias holds NaN values')]:
        result = run_in_process(cifar.main, *common, *extra, cwd=tmp_path)
        expect_user_error(result, phrase)
        assert not os.path.exists(tmp_path / extra[-1] / 'log.txt') and 'diverged' not in result.stderr

    tree = tmp_path / 'tree'
    shutil.copytree(image_tree, tree)
    os.makedirs(tree / 'train/class4/more')
    shutil.copy(tree / 'train/class4/0004.png', tree / 'train/class4/more/again.png')
    ok(run_in_process(cifar.main, *TINY, '--epochs', 1, '--dataroot', tree, '--save', 'logs/n', cwd=tmp_path))
    [line] = log_lines(tmp_path / 'logs/n')
    assert (line['n_train'], line['n_test']) == (101, 40)

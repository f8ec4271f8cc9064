"""summarize.py through its command line: on logs written here in the formats of cifar.py and
of the original code, and on runs that cifar.py makes in the test."""
import json
import os
import statistics

import pytest

import summarize
from conftest import check_png, run_cli

OPTIONS = {'depth': 16, 'width': 1.0, 'dataset': 'CIFAR10', 'dataroot': 'data', 'dtype': 'float',
           'nthread': 4, 'teacher_id': 'wrn16-2', 'batch_size': 128, 'lr': 0.1, 'epochs': 3,
           'weight_decay': 0.0005, 'epoch_step': '[60,120,160]', 'lr_decay_ratio': 0.2, 'resume': '',
           'randomcrop_pad': 4, 'temperature': 4, 'alpha': 0, 'beta': 1000.0, 'seed': 1,
           'reference': False, 'compile': 'auto', 'cuda': False, 'save': '', 'ngpu': 1, 'gpu_id': '0'}

# A line as the original code wrote it (Python 2 json.dumps): other option names, no seed,
# NaN where an AT meter saw no batch.
ORIGINAL = ('json_stats: {"optim_method": "SGD", "width": 1.0, "dataset": "CIFAR10", "depth": 16, '
            '"data_root": ".", "batchSize": 128, "epoch_step": "[60,120,160]", "randomcrop_pad": 4, '
            '"weightDecay": 0.0005, "teacher_id": "", "resume": "", "temperature": 4, "alpha": 0, '
            '"beta": 0, "lr_decay_ratio": 0.2, "nthread": 4, "cuda": true, "save": "%s", "dtype": '
            '"float", "gpu_id": "0", "ngpu": 1, "lr": 0.1, "epochs": 2, "train_loss": 0.5, '
            '"train_acc": 80.0, "test_loss": 0.6, "test_acc": %s, "epoch": %d, "num_classes": 10, '
            '"n_parameters": 175994, "train_time": 20.0, "test_time": 2.0, '
            '"at_losses": [[NaN, NaN], [NaN, NaN], [NaN, NaN]]}\n')
ORIGINAL_IMAGENET = ('json_stats: {"imagenetpath": "/data/ILSVRC2012", "depth": 18, "width": 1.0, '
                     '"teacher_id": "", "batchSize": 256, "epochs": 100, "alpha": 0, "beta": 0, '
                     '"save": "logs/r18", "train_loss": 1.2, "train_acc": [70.0, 88.0], "test_loss": 1.3, '
                     '"test_acc": [69.5, 89.0], "epoch": 100, "n_parameters": 11689512, '
                     '"train_time": 3000.0, "test_time": 100.0, "at_losses": [[NaN, NaN]]}\n')


def write_log(run_dir, lines):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'log.txt'), 'w') as f:
        f.writelines(lines)


def ours(epoch_errors, **options):
    stats = [{**OPTIONS, **options, 'train_loss': 0.1, 'train_acc': 90.0, 'test_loss': 0.3,
              'test_acc': 100 - e, 'epoch': i, 'num_classes': 10, 'n_parameters': 175994,
              'train_time': 10.0, 'test_time': 1.0, 'at_losses': [[1e-4, 1e-5]] * 3}
             for i, e in enumerate(epoch_errors, 1)]
    return ['json_stats: ' + json.dumps(s) + '\n' for s in stats]


def table_rows(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    return [dict(zip(header, (c.strip() for c in line.strip('|').split('|')))) for line in lines[2:]]


def test_table_groups_seeds_marks_unfinished_runs_and_reads_original_logs(tmp_path, monkeypatch, capsys):
    finals = {1: 8.1, 2: 7.7, 3: 8.4}
    for seed, final in finals.items():  # same configuration, also run from another folder
        write_log(tmp_path / f'logs/at-{seed}', ours([30.0, 12.0, final], seed=seed,
                                                     save=f'logs/at-{seed}', dataroot=f'/d{seed}'))
    write_log(tmp_path / 'logs/kd-1', ours([40.0, 11.0, 9.0], beta=0, alpha=0.9, seed=1))
    # Still training: two of three epochs logged, the third line half written.
    half = ours([50.0, 20.0], beta=0, alpha=0.9, seed=2) + [ours([9.0])[0][:70]]
    write_log(tmp_path / 'logs/kd-2', half)
    write_log(tmp_path / 'logs/old-a', [ORIGINAL % ('old-a', 85.0, 1), ORIGINAL % ('old-a', 91.0, 2)])
    write_log(tmp_path / 'logs/old-b', [ORIGINAL % ('old-b', 90.5, 1), ORIGINAL % ('old-b', 91.5, 2)])
    write_log(tmp_path / 'logs/r18', [ORIGINAL_IMAGENET])
    write_log(tmp_path / 'logs/at-lr', ours([30.0, 12.0, 9.5], lr=0.05))  # only the lr differs
    write_log(tmp_path / 'logs/fresh', [])  # resumed, its one line cut short and dropped: no epoch done yet
    (tmp_path / 'logs/fresh/model.pt7').write_bytes(b'')

    monkeypatch.chdir(tmp_path)
    summarize.main(['logs', '--plot', 'curves.png', '--log_scale'])
    out, err = capsys.readouterr()
    rows = table_rows(out)
    assert len(rows) == 5, out
    fresh, torn = err.strip().splitlines()
    assert fresh.endswith('warning: logs/fresh: no epoch finished yet, left out')
    assert 'warning: logs/kd-2/log.txt: its last line is cut short' in torn and 'resuming the run repairs it' in torn

    at = next(r for r in rows if r['weights'] == 'beta 1000' and r['differs in'] == 'lr=0.1')
    assert (at['student'], at['teacher'], at['runs']) == ('WRN-16-1', 'wrn16-2', '3')
    assert float(at['final error %']) == statistics.median(finals.values())
    assert at['range'] == '7.70-8.40' and float(at['best error %']) == 7.7
    assert at['epochs'] == '3' and at['time/epoch'] == '11.0 s'

    kd = next(r for r in rows if r['weights'] == 'alpha 0.9')
    assert kd['runs'] == '2 (1 unfinished)' and kd['epochs'] == '3 (2 done)'
    assert float(kd['final error %']) == 9.0 and kd['range'] == '-'  # the finished run only

    old = next(r for r in rows if r['data'] == 'CIFAR10' and r['teacher'] == '-')
    assert old['runs'] == '2' and old['differs in'] == ''
    assert float(old['final error %']) == 8.75 and old['range'] == '8.50-9.00'

    imagenet = next(r for r in rows if r['data'] == 'ImageNet')
    assert imagenet['student'] == 'ResNet-18' and float(imagenet['final error %']) == 30.5
    other_lr = next(r for r in rows if r['differs in'] == 'lr=0.05')
    assert other_lr['runs'] == '1' and other_lr['range'] == '-' and float(other_lr['final error %']) == 9.5
    check_png(tmp_path / 'curves.png', 500, 300)


def test_bad_input_is_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / 'empty')
    write_log(tmp_path / 'damaged', ours([10.0, 9.0])[:1] + ['json_stats: {"epoch": 2,\n'] + ours([8.0]))
    for path, message in [('missing', 'missing is not a directory'), ('empty', 'no log.txt in'),
                          ('damaged', 'damaged/log.txt:2 is not a valid json_stats line')]:
        with pytest.raises(SystemExit) as stop:
            summarize.main([str(tmp_path / path)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_damaged_run_is_left_out_with_a_warning_and_the_others_are_tabled(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / 'logs/good', ours([10.0, 9.0, 8.5]))
    write_log(tmp_path / 'logs/bad', ours([10.0])[:1] + ['json_stats: {"epoch": 2,\n'] + ours([8.0]))
    monkeypatch.chdir(tmp_path)
    summarize.main(['logs'])
    out, err = capsys.readouterr()
    assert [r['runs'] for r in table_rows(out)] == ['1']
    [warning] = err.strip().splitlines()
    assert 'warning: logs/bad/log.txt:2 is not a valid json_stats line' in warning
    assert warning.endswith('logs/bad left out')


def test_runs_of_cifar_py_differing_in_seed_are_one_configuration(image_tree, tmp_path):
    for seed in (1, 2):
        made = run_cli('cifar.py', '--depth', 10, '--width', 0.5, '--batch_size', 32, '--nthread', 2,
                       '--epochs', 1, '--seed', seed, '--dataroot', image_tree,
                       '--save', f'logs/s{seed}', cwd=tmp_path)
        assert made.returncode == 0, made.stderr[-2000:]
    result = run_cli('summarize.py', 'logs/s1', 'logs/s2', '--plot', 'curves.png', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = table_rows(result.stdout)
    assert (row['student'], row['teacher'], row['runs'], row['epochs']) == ('WRN-10-0.5', '-', '2', '1')
    check_png(tmp_path / 'curves.png', 500, 300)


def test_transfer_options_left_at_their_defaults_group_with_runs_that_predate_them(tmp_path, monkeypatch, capsys):
    neutral = dict(at_p=2, at_form='code', beta_decay=1, grad_beta=0, sym_beta=0, factt_beta=0,
                   fitnet_beta=0, cos_beta=0, aux_weight=0)
    per_epoch = dict(loss_weights={'distillation': 1, 'at': 1000}, distillation_loss=[1.2, 0.1])
    write_log(tmp_path / 'logs/before', ours([10.0], epochs=1, seed=1))
    write_log(tmp_path / 'logs/after', ours([12.0], epochs=1, seed=2, **neutral, **per_epoch))
    write_log(tmp_path / 'logs/factt', ours([9.0], epochs=1, seed=1, **per_epoch,
                                            **{**neutral, 'factt_beta': 1.0, 'at_p': 4.0, 'beta_decay': 0.1},
                                            factt_losses=[[0.5, 0.1]] * 3))
    monkeypatch.chdir(tmp_path)
    summarize.main(['logs'])
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2
    at = next(r for r in rows if r['weights'] == 'beta 1000')
    assert at['runs'] == '2' and float(at['final error %']) == 11.0
    factt = next(r for r in rows if r['weights'] != 'beta 1000')
    assert factt['weights'] == 'beta 1000, factt_beta 1, at_p 4, beta_decay 0.1' and factt['runs'] == '1'


def test_the_benchmark_methods_at_their_defaults_group_with_runs_that_predate_them():
    import cifar
    import methods
    defaults = vars(cifar.parse_args(['--save', 'x']))
    # every flag of the methods but those of the original code (temperature, alpha, beta) and the
    # init stage (resolved to 0 when a run has none)
    new = {f.name: defaults[f.name] for f in methods.flags()
           if f.name not in ('temperature', 'alpha', 'beta', 'init_epochs')}
    before = {**OPTIONS, 'epoch': 3, 'test_acc': 90.0}
    assert summarize.configuration(before) == summarize.configuration({**before, **new})
    dkd = {**before, **new, 'beta': 0, 'dkd_beta': 1.0, 'dkd_nckd': 6.0}
    assert summarize.learns_from_teacher(dkd) and summarize.method_weights(dkd) == 'dkd_beta 1, dkd_nckd 6'
    assert summarize.configuration(dkd) != summarize.configuration({**dkd, 'dkd_nckd': 8.0})
    settings = {f.name for f in methods.flags() if not f.weight} - {'temperature', 'init_lr'}
    assert set(summarize.METHOD_SETTINGS) == settings  # every setting but these two is shown when changed


def test_image_counts_do_not_split_runs_logged_before_them_from_runs_that_log_them():
    before = {**OPTIONS, 'epoch': 3, 'test_acc': 90.0}
    assert summarize.configuration(before) == summarize.configuration({**before, 'n_train': 50000, 'n_test': 10000})


def test_paired_table_gives_each_cohort_member_its_gain_over_the_members_named(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / 'cohort/student', ours([40.0, 33.0, 32.5], beta=0))
    write_log(tmp_path / 'cohort/at', ours([35.0, 30.0, 29.0]))
    write_log(tmp_path / 'cohort/kd', ours([38.0, 31.0], beta=0, alpha=0.9))  # one epoch to go
    write_log(tmp_path / 'cohort/sp', ours([60.0, 50.0, 45.0], beta=0, sp_beta=3000.0, lr=0.05))
    write_log(tmp_path / 'cohort/teacher', ours([30.0, 20.0, 10.0], beta=0, width=2))  # its log beside them
    monkeypatch.chdir(tmp_path)
    summarize.main(['cohort', '--paired', 'student,at'])
    out = capsys.readouterr().out
    paired = table_rows(out[out.index('| run |'):])
    assert [r['run'] for r in paired] == ['at', 'kd', 'student', 'sp']  # best first; the teacher is no pair
    gains = {r['run']: (r['gain over student'], r['gain over at']) for r in paired}
    assert gains == {'at': ('+3.50', '-'), 'kd': ('+1.50', '-2.00'), 'student': ('-', '-3.50'),
                     'sp': ('-12.50', '-16.00')}
    assert next(r for r in paired if r['run'] == 'sp')['weights'] == 'sp_beta 3000, lr 0.05'  # its own rate
    assert 'unfinished (their latest epoch): kd' in out
    assert 'not paired (not a WRN-16-1): teacher' in out

    for names, message in [('student,ab', '--paired ab: no run folder of that name'),
                           ('student', '--paired student: 2 runs have that folder name')]:
        write_log(tmp_path / 'other/student', ours([40.0, 33.0, 32.0], beta=0))
        with pytest.raises(SystemExit) as stop:
            summarize.main(['cohort', 'other', '--paired', names] if 'ab' not in names
                           else ['cohort', '--paired', names])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err

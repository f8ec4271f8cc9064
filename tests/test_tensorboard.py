"""tensorboard_log.py: the event files in <save>/tb/, read back as TensorBoard reads them."""
import json
import math
import os
import signal
import time
from argparse import Namespace

import pytest
import torch
from ignite.engine import Engine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import cifar
import summarize
from conftest import run_in_process
from engine import tensorboard_log
from test_cifar import expect_user_error, log_lines, ok
from test_runs_survive import load
from test_stages import stop_at

# 100 training images: 10 steps an epoch at batch 10, 25 at batch 4
SMALL = ['--depth', 10, '--width', 0.5, '--nthread', 2, '--seed', 3]
EPOCH_TAGS = {'train/loss', 'train/acc', 'test/loss', 'test/acc', 'train/time', 'test/time',
              'terms/cross_entropy_loss', 'schedule/lr', 'schedule/cross_entropy_weight'}


def curves(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard's Python reader shows them (purging included)."""
    reader = EventAccumulator(os.path.join(run_dir, 'tb'))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()['scalars']}


def assert_epoch_points_match_log(points, records, epoch_length):
    """Each epoch's points exactly once, at the epoch's last step, with its log line's values."""
    steps = [r['epoch'] * epoch_length for r in records]
    for tag, field in (('train/loss', 'train_loss'), ('train/acc', 'train_acc'), ('test/loss', 'test_loss'),
                       ('test/acc', 'test_acc'), ('terms/cross_entropy_loss', 'cross_entropy_loss')):
        assert [s for s, _ in points[tag]] == steps, tag
        logged = [r[field][0] if isinstance(r[field], list) else r[field] for r in records]
        assert [v for _, v in points[tag]] == pytest.approx(logged, rel=1e-6), tag  # stored as float32


def test_two_epochs_write_every_curve_at_its_steps(image_tree, tmp_path):
    ok(run_in_process(cifar.main, *SMALL, '--batch_size', 10, '--epochs', 2, '--epoch_step', '[2]',
                      '--lr_decay_ratio', 0.5, '--tensorboard_every', 3, '--dataroot', image_tree,
                      '--save', 'logs/run', cwd=tmp_path))
    points = curves(tmp_path / 'logs/run')
    assert set(points) == EPOCH_TAGS | {'train/step_loss'}
    assert_epoch_points_match_log(points, log_lines(tmp_path / 'logs/run'), 10)
    assert points['schedule/lr'] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05))]
    assert points['schedule/cross_entropy_weight'] == [(10, 1.0), (20, 1.0)]
    assert [s for s, _ in points['train/step_loss']] == [3, 6, 9, 12, 15, 18]
    assert all(math.isfinite(v) and v > 0 for _, v in points['train/step_loss'])


def test_a_run_stopped_mid_epoch_and_resumed_has_each_point_once(image_tree, tmp_path):
    args = [*SMALL, '--batch_size', 4, '--epochs', 2, '--tensorboard_every', 5, '--dataroot', image_tree,
            '--save', 'logs/run']
    stopped = run_in_process(stop_at(cifar.main, step=30), *args, cwd=tmp_path)  # SIGTERM at epoch 2, step 5
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    err = stopped.stderr
    stopped_at = load(tmp_path / 'logs/run')['iteration']
    assert 25 < stopped_at < 50, err.strip().splitlines()[-1]  # inside epoch 2
    # What a run killed after its checkpoint leaves: points past the step it resumes from.
    time.sleep(1.1)  # event files are read in the order of their names, which start with the second
    stale = SummaryWriter(str(tmp_path / 'logs/run/tb'))
    stale.add_scalar('train/step_loss', -1.0, stopped_at + 1)
    for tag in ('train/loss', 'test/acc'):
        stale.add_scalar(tag, -1.0, 50)
    stale.close()

    ok(run_in_process(cifar.main, *args, '--resume', 'logs/run/model.pt7', cwd=tmp_path))
    records = log_lines(tmp_path / 'logs/run')
    assert [r['epoch'] for r in records] == [1, 2]
    points = curves(tmp_path / 'logs/run')
    assert set(points) == EPOCH_TAGS | {'train/step_loss'}
    assert_epoch_points_match_log(points, records, 25)
    assert [s for s, _ in points['train/step_loss']] == list(range(5, 51, 5))
    assert all(v > 0 for _, v in points['train/step_loss'])


def test_a_cohort_writes_one_tb_per_member(image_tree, tmp_path):
    members = [{'name': 'a', 'seed': 1}, {'name': 'b', 'seed': 2}]
    ok(run_in_process(cifar.main, *SMALL, '--batch_size', 10, '--epochs', 1, '--tensorboard_every', 4,
                      '--dataroot', image_tree, '--save', 'logs/c', '--cohort', json.dumps(members), cwd=tmp_path))
    # the cohort's folder holds its members and their list only
    assert sorted(os.listdir(tmp_path / 'logs/c')) == ['a', 'b', 'members.json']
    for name in ('a', 'b'):
        points = curves(tmp_path / 'logs/c' / name)
        assert_epoch_points_match_log(points, log_lines(tmp_path / 'logs/c' / name), 10)
        assert [s for s, _ in points['train/step_loss']] == [4, 8]
    assert curves(tmp_path / 'logs/c/a')['train/loss'] != curves(tmp_path / 'logs/c/b')['train/loss']


def test_off_and_a_missing_package_write_nothing(image_tree, tmp_path, monkeypatch):
    common = [*SMALL, '--batch_size', 10, '--epochs', 1, '--dataroot', image_tree]
    ok(run_in_process(cifar.main, *common, '--tensorboard', 'off', '--save', 'logs/off', cwd=tmp_path))
    assert sorted(os.listdir(tmp_path / 'logs/off')) == ['log.txt', 'model.pt7']

    monkeypatch.setattr(tensorboard_log, 'available', lambda: False)
    r = ok(run_in_process(cifar.main, *common, '--save', 'logs/auto', cwd=tmp_path))
    assert 'tensorboard is not installed: no live curves in logs/auto/tb' in r.stdout
    assert not os.path.exists(tmp_path / 'logs/auto/tb')
    expect_user_error(run_in_process(cifar.main, *common, '--tensorboard', 'on', '--save', 'logs/on', cwd=tmp_path),
                      '--tensorboard on needs the tensorboard package', 'pip install tensorboard')
    assert not os.path.exists(tmp_path / 'logs/on')


def test_the_flags_do_not_split_tables():  # their rules: tests/test_options.py
    record = {'depth': 16, 'width': 1, 'lr': 0.1, 'tensorboard': 'auto', 'tensorboard_every': 50}
    assert summarize.configuration(record) == summarize.configuration(
        {**record, 'tensorboard': 'off', 'tensorboard_every': 10})


def test_epoch_scalars_name_every_field_of_a_student_line():
    stats = {'train_loss': 2.5, 'train_acc': 40.0, 'test_loss': 2.0, 'test_acc': 45.0, 'train_top5': 80.0,
             'test_top5': 85.0, 'train_time': 3.0, 'test_time': 1.0, 'epoch': 4, 'n_parameters': 10,
             'distillation_loss': [1.5, 0.1], 'at_losses': [[0.25, 0.01], [0.5, 0.02], [None, None]],
             'loss_weights': {'distillation': 1.0, 'at': 500.0}, 'num_classes': 10}
    assert tensorboard_log.epoch_scalars(stats, 0.02) == {
        'train/loss': 2.5, 'train/acc': 40.0, 'test/loss': 2.0, 'test/acc': 45.0, 'train/top5': 80.0,
        'test/top5': 85.0, 'train/time': 3.0, 'test/time': 1.0,
        'terms/distillation_loss': 1.5, 'terms/at_losses/0': 0.25, 'terms/at_losses/1': 0.5,
        'schedule/lr': 0.02, 'schedule/distillation_weight': 1.0, 'schedule/at_weight': 500.0}


class Run:
    """What attach reads of a members.Member."""

    def __init__(self, opt, start_iteration):
        self.opt, self.start_iteration = opt, start_iteration

    def own(self, iteration):  # a run without init stage in a cohort without one: the trainer's step
        return iteration


def test_only_rank_0_writes(tmp_path):
    run = Run(Namespace(save=str(tmp_path / 'run')), start_iteration=0)
    opt = Namespace(tensorboard='on', tensorboard_every=1, save=str(tmp_path / 'run'))
    trainer = Engine(lambda engine, batch: {run: {'loss': torch.tensor(float(batch))}})
    with tensorboard_log.attach(trainer, [run], opt, main=False):
        trainer.run([1, 2], max_epochs=1)
    assert not os.path.exists(tmp_path / 'run')
    with tensorboard_log.attach(trainer, [run], opt, main=True):
        trainer.run([1, 2], max_epochs=1)
    assert curves(tmp_path / 'run') == {'train/step_loss': [(1, 1.0), (2, 2.0)]}

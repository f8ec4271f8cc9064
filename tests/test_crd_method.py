"""CRD (contrastive representation distillation) and CRD+KD through cifar.py: the negatives of
RepDistiller's 'exact' mode, a run that trains and logs its terms, a resume that continues the
memory bitwise, and the refusals.

The data is the tiny CIFAR-100 release of test_crd.py (16 training images of 16 classes, batches
of 4): these runs check the wiring and the bookkeeping, not that anything learns."""
import json
import os

import pytest
import torch

import cifar
from conftest import run_in_process
from engine.errors import UserError
from methods.crd import classes_of as crd_classes
from methods.crd import negatives as crd_negatives
from test_cifar import checkpoint, expect_user_error, log_lines, ok
from test_crd import make_cifar100_release, save_published

# CRD+KD as RepDistiller weighs it (-r 1 -a 1 -b 0.8), on the 16 tiny images.
CRD_KD = ['--dataset', 'CIFAR100', '--dataroot', 'data', '--batch_size', 4, '--nthread', 1, '--arch', 'resnet8',
          '--teacher_params', 'resnet8.pth', '--teacher_arch', 'resnet8', '--crop_padding', 'zero',
          '--normalization', 'cifar100', '--epoch_step', '[]', '--lr', 0.05, '--seed', 4, '--dtype', 'double',
          '--kd_beta', 1, '--crd_beta', 0.8, '--crd_feat_dim', 16, '--crd_nce_k', 8]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp('crd_method')
    make_cifar100_release(str(d / 'data'))
    save_published('resnet8', d / 'resnet8.pth')
    return d


# ----------------------------------------------------------------------------------------------
# The negatives

def test_negatives_are_other_classes_distinct_and_a_function_of_the_seed():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    classes = crd_classes(labels)
    y = torch.tensor([0, 2, 3, 1])

    def draw(seed):
        return crd_negatives(classes, y, 5, torch.Generator().manual_seed(seed))

    negatives = draw(7)
    assert negatives.shape == (4, 5)
    for row, c in zip(negatives.tolist(), y.tolist()):
        assert len(set(row)) == 5 and all(labels[i] != c for i in row)  # every class has >= 6 others
    assert torch.equal(draw(7), negatives) and not torch.equal(draw(8), negatives)


def test_a_class_with_fewer_others_than_k_draws_with_replacement():
    """Class 1 has 9 images and one other; class 0 has one image and nine others: with k = 5 the
    first draws the one image five times, the second five distinct images."""
    labels = torch.tensor([0] + [1] * 9)
    negatives = crd_negatives(crd_classes(labels), torch.tensor([1, 0]), 5, torch.Generator().manual_seed(0))
    assert negatives[0].tolist() == [0] * 5
    assert len(set(negatives[1].tolist())) == 5 and 0 not in negatives[1].tolist()


def test_every_image_of_other_classes_is_drawn_about_equally_often():
    labels = torch.arange(12) % 3
    classes, g = crd_classes(labels), torch.Generator().manual_seed(1)
    counts = torch.zeros(12)
    for _ in range(300):
        counts += torch.bincount(crd_negatives(classes, torch.tensor([0]), 4, g).flatten(), minlength=12)
    assert counts[labels == 0].sum() == 0
    # 300 draws of 4 of the 8 others: each 150 times on average, sd about 8.7
    assert (counts[labels != 0] - 150).abs().max() < 40, counts


# ----------------------------------------------------------------------------------------------
# Runs through cifar.py

def test_crd_kd_trains_logs_its_terms_and_keeps_its_memory(workdir):
    ok(run_in_process(cifar.main, *CRD_KD, '--epochs', 1, '--save', 'logs/crd_kd', cwd=workdir))
    line, = log_lines(workdir / 'logs/crd_kd')
    weights = line['loss_weights']  # alpha 0: the distillation term is the cross-entropy
    assert weights['distillation'] == 1 and weights['kd'] == 1 and weights['crd'] == 0.8
    assert line['crd_loss'][0] > 0 and line['kd_loss'][0] > 0
    params = checkpoint(workdir / 'logs/crd_kd')['params']
    memory = params['aux.crd.memory_s']
    assert memory.shape == (16, 16) and memory.dtype == torch.float64
    # every image was in a batch once: every row moved onto the unit sphere
    torch.testing.assert_close(memory.norm(dim=1), torch.ones(16, dtype=torch.float64))
    assert (params['aux.crd.z'] > 0).all()


def test_a_resumed_crd_run_is_bitwise_the_uninterrupted_one(workdir):
    ok(run_in_process(cifar.main, *CRD_KD, '--epochs', 3, '--save', 'logs/straight', cwd=workdir))
    ok(run_in_process(cifar.main, *CRD_KD, '--epochs', 1, '--save', 'logs/split', cwd=workdir))
    ok(run_in_process(cifar.main, *CRD_KD, '--epochs', 3, '--save', 'logs/split', '--resume',
                      'logs/split/model.pt7', cwd=workdir))
    a, b = checkpoint(workdir / 'logs/straight')['params'], checkpoint(workdir / 'logs/split')['params']
    assert a.keys() == b.keys() and {'aux.crd.memory_s', 'aux.crd.memory_t', 'aux.crd.z'} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('flags, phrases', [
    (['--crd_nce_k', 16], ['--crd_nce_k 16', '16 training images', '--crd_nce_k 15 or fewer']),
    (['--alpha', 0.9], ['--kd_beta 1', '--alpha 0.9', 'twice', '--alpha 0']),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(flags, phrases, workdir):
    result = run_in_process(cifar.main, *CRD_KD, '--epochs', 1, *flags, '--save', 'logs/refused', cwd=workdir)
    expect_user_error(result, *phrases)
    assert not os.path.exists(workdir / 'logs/refused')


def test_a_cohort_member_may_not_count_kd_twice(workdir):
    result = run_in_process(cifar.main, *CRD_KD, '--epochs', 1, '--cohort', '[{"name": "a", "alpha": 0.5}]',
                            '--save', 'logs/refused_cohort', cwd=workdir)
    expect_user_error(result, "member 'a'", '--alpha 0.5', 'twice')
    assert not os.path.exists(workdir / 'logs/refused_cohort')


def test_crd_under_torchrun_is_refused(monkeypatch, workdir):
    """Each process would update the memory with its own slice of the batch only."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(UserError, match='--crd_beta keeps a memory of every training image.*one process'):
        cifar.parse_args([*map(str, CRD_KD), '--save', str(workdir / 'logs/torchrun')])


def test_each_crd_member_of_a_cohort_equals_its_single_run(workdir):
    """Members draw their negatives from their own seeds and keep their own memories, though the
    batches and the teacher's forward are shared."""
    members = [{'name': 'a', 'seed': 1}, {'name': 'b', 'seed': 2, 'crd_nce_k': 5, 'kd_beta': 0}]
    ok(run_in_process(cifar.main, *CRD_KD, '--epochs', 1, '--data_seed', 9, '--cohort', json.dumps(members),
                      '--save', 'logs/crd_cohort', cwd=workdir))
    singles = {}
    for member in members:
        flags = [x for k, v in member.items() if k != 'name' for x in (f'--{k}', v)]
        ok(run_in_process(cifar.main, *CRD_KD, '--epochs', 1, '--data_seed', 9, *flags,
                          '--save', f'logs/crd_single_{member["name"]}', cwd=workdir))
        a = checkpoint(workdir / 'logs/crd_cohort' / member['name'])['params']
        singles[member['name']] = b = checkpoint(workdir / f'logs/crd_single_{member["name"]}')['params']
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (member['name'], k)
    assert not torch.equal(singles['a']['aux.crd.memory_s'], singles['b']['aux.crd.memory_s'])

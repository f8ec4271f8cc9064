"""The distillation-oriented trainer (methods/dot.py): its step against the paper's update written
out, a cohort member stepping with it resumed bit for bit where an uninterrupted one ends, and
what is refused. Its steps against the authors' code are tests/test_parity.py's (kd_dot)."""
import json

import pytest
import torch

import cifar
import methods
from conftest import make_image_tree, run_in_process
from engine.errors import UserError
from methods.dot import KD_DOT, DistillationOrientedSGD
from test_cifar import checkpoint, log_lines, ok

LR, DELTA, WD = 0.1, 0.075, 5e-4


def losses(a, b, c, x):
    """A task loss reaching a and b, a distillation loss reaching a and c (a learned part of its own)."""
    task = ((x @ a).tanh() @ b).pow(2).mean()
    kd = ((x @ a).sin() @ c).pow(2).mean() + (a - 0.5).pow(2).sum()
    return task, kd


def by_hand(start, batches):
    """The paper's update with the authors' first step: momenta 0.9 -/+ delta where both gradients
    reach a tensor, 0.9 (with the weight decay) where one does; a buffer starts as its first
    gradient, the distillation's without the weight decay."""
    p = {k: v.clone().requires_grad_() for k, v in start.items()}
    v_task, v_kd = {}, {}
    m_task, m_kd, mean = 0.9 - DELTA, 0.9 + DELTA, 0.9
    for x in batches:
        task, kd = losses(p['a'], p['b'], p['c'], x)
        g_task = dict(zip('ab', torch.autograd.grad(task, [p['a'], p['b']])))
        g_kd = dict(zip('ac', torch.autograd.grad(kd, [p['a'], p['c']])))
        with torch.no_grad():
            for k, g in g_task.items():
                d = g + WD * p[k]
                v_task[k] = d.clone() if k not in v_task else (m_task if k in g_kd else mean) * v_task[k] + d
                p[k] -= LR * v_task[k]
            for k, g in g_kd.items():
                if k not in v_kd:
                    v_kd[k] = g.clone()
                else:
                    v_kd[k] = m_kd * v_kd[k] + g if k in g_task else mean * v_kd[k] + g + WD * p[k]
                p[k] -= LR * v_kd[k]
    return p


def test_a_step_is_the_papers_update_written_out():
    g = torch.Generator().manual_seed(0)
    start = {k: torch.randn(*shape, generator=g, dtype=torch.float64)
             for k, shape in {'a': (6, 5), 'b': (5, 3), 'c': (5, 2)}.items()}
    batches = [torch.randn(8, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    p = {k: v.clone().requires_grad_() for k, v in start.items()}
    opt = DistillationOrientedSGD(list(p.values()), LR, DELTA, WD)
    sgd_p = {k: v.clone().requires_grad_() for k, v in start.items()}
    sgd = torch.optim.SGD(list(sgd_p.values()), LR, momentum=0.9, weight_decay=WD)
    for x in batches:
        opt.zero_grad(set_to_none=True)
        task, kd = losses(p['a'], p['b'], p['c'], x)
        opt.backward({'distillation': task, 'kd': kd}, 1.0)
        opt.step()
        sgd.zero_grad()
        sum(losses(sgd_p['a'], sgd_p['b'], sgd_p['c'], x)).backward()
        sgd.step()
    want = by_hand(start, batches)
    for k in p:
        assert torch.allclose(p[k], want[k], rtol=1e-13, atol=0), k
    assert not torch.allclose(p['a'], sgd_p['a'], rtol=1e-4)  # both gradients reach a: DOT is not SGD there


def test_a_kd_dot_member_resumes_bit_for_bit_and_steps_otherwise_than_kd(tmp_path):
    """KD and KD+DOT (mdistiller's KD) from the same seed in one cohort: stopped after one epoch and
    resumed, KD+DOT ends bit for bit where the uninterrupted cohort ends, its checkpoint holds both
    momenta, and it ends elsewhere than KD."""
    make_image_tree(str(tmp_path / 'data'), n_train=32, n_test=16)
    run = ['--depth', 10, '--width', 0.5, '--batch_size', 16, '--nthread', 1, '--dataroot', 'data', '--precision',
           'fp32', '--deterministic']
    ok(run_in_process(cifar.main, *run, '--epochs', 1, '--seed', 1, '--save', 'logs/teacher', cwd=tmp_path))
    kd = {k: v for k, v in KD_DOT.items() if k != 'dot_delta'}
    members = [{'name': 'kd', 'seed': 2, **kd}, {'name': 'kd_dot', 'seed': 2, **KD_DOT}]
    common = [*run, '--teacher_id', 'teacher', '--cohort', json.dumps(members)]
    ok(run_in_process(cifar.main, *common, '--epochs', 2, '--save', 'logs/straight', cwd=tmp_path))
    ok(run_in_process(cifar.main, *common, '--epochs', 1, '--save', 'logs/split', cwd=tmp_path))
    ok(run_in_process(cifar.main, *common, '--epochs', 2, '--save', 'logs/split', '--resume', 'logs/split',
                      cwd=tmp_path))
    straight, split = checkpoint(tmp_path / 'logs/straight/kd_dot'), checkpoint(tmp_path / 'logs/split/kd_dot')
    a, b = straight['params'], split['params']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r['train_loss'] for r in log_lines(tmp_path / 'logs/split/kd_dot')] == \
        [r['train_loss'] for r in log_lines(tmp_path / 'logs/straight/kd_dot')]
    state = split['optimizer']['state'].values()
    assert all({'momentum_buffer', 'momentum_kd_buffer'} <= set(s) for s in state) and state
    plain = checkpoint(tmp_path / 'logs/straight/kd')['params']
    assert any(not torch.equal(plain[k], a[k]) for k in a if k.startswith('student.'))
    assert log_lines(tmp_path / 'logs/straight/kd_dot')[0]['dot_delta'] == DELTA


@pytest.mark.parametrize('flags, phrases', [
    (['--dot_delta', 0.075], ['--dot_delta 0.075', 'this run has none', '--kd_beta 0.9']),
    (['--teacher_id', 't', '--alpha', 0.9, '--dot_delta', 0.075], ['--alpha 0.9 puts both in one term',
                                                                    'use --alpha 0 with --kd_beta']),
    (['--teacher_id', 't', '--kd_beta', 1, '--dot_delta', 0.1], ['--dot_delta 0.1', 'outside [0, 0.1)']),
    (['--teacher_id', 't', '--kd_beta', 1, '--dot_delta', -0.01], ['--dot_delta -0.01']),
])
def test_bad_dot_options_are_refused_in_one_line(flags, phrases):
    with pytest.raises(UserError) as e:
        cifar.parse_args(['--save', 'unused', *map(str, flags)])
    message = str(e.value)
    assert '\n' not in message and all(p in message for p in phrases), message


def test_it_steps_any_distillation_and_its_column_is_the_authors_configuration():
    assert cifar.parse_args(['--save', 'unused', '--teacher_id', 't', '--beta', '1000', '--dot_delta', '0.075'])
    peers = [{'name': 'a', 'dml_beta': 1, 'dot_delta': 0.075}, {'name': 'b', 'dml_beta': 1}]
    assert cifar.parse_args(['--save', 'unused', '--cohort', json.dumps(peers)])
    column = methods.columns('crd', 'resnet32x4', 'resnet8x4', methods.probe('resnet32x4', 'resnet8x4'))['kd_dot']
    assert column == {'alpha': 0, 'ce_weight': 0.1, 'kd_beta': 0.9, 'temperature': 4, 'dot_delta': 0.075}

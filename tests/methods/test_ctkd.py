"""CTKD (methods/ctkd.py): its curriculum against the authors' cosine schedule written out; its
gradient reversal against KD's and DKD's formulas written out (the student's gradient is that of
the loss at the learned temperature, the temperature's is -lambda times it); the epoch the engine
hands it, in a run and in a resumed one; what it refuses; its columns."""
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from test_registry import options, wrn_pair

import cifar
import methods
from conftest import run_in_process
from engine.errors import UserError
from engine.members import join_networks
from engine.objective import kind
from engine.options import check_transfer_options
from engine.rules import check_option
from methods import ctkd
from methods.dkd import NCKD
from test_cifar import TINY, checkpoint, log_lines, ok


@pytest.mark.parametrize('low, high, epochs', [(0, 1, 10), (0, 1, 5), (0.2, 0.7, 3)])
def test_the_reversal_strength_is_the_authors_cosine_decay_negated(low, high, epochs):
    """Their gradient reversal multiplies by CosineDecay(max_value, min_value, num_loops).get_value(epoch)
    with max_value -lambda_min, min_value -lambda_max: (cos(i pi / E) + 1) / 2 (max - min) + min."""
    for epoch in range(0, epochs + 3):
        i = min(epoch, epochs)
        theirs = (math.cos(i * math.pi / epochs) + 1.0) * 0.5 * (-low - -high) + -high
        assert ctkd.reversal_strength(epoch, low, high, epochs) == -theirs
    strengths = [ctkd.reversal_strength(e, low, high, epochs) for e in range(epochs + 2)]
    assert strengths[0] == low and strengths[-2] == strengths[-1] == high
    assert strengths == sorted(strengths)


def test_the_curriculum_rises_as_the_paper_draws_it():
    assert ctkd.reversal_strength(1) == pytest.approx((1 - math.cos(math.pi / 10)) / 2, rel=1e-15)  # 0.0245
    assert ctkd.reversal_strength(5) == pytest.approx(0.5, rel=1e-15)
    assert ctkd.reversal_strength(10) == ctkd.reversal_strength(240) == 1.0


def kd_by_hand(y_s, y_t, labels, T, alpha=0.9):
    """alpha T^2 mean_i sum_c p_t log(p_t / p_s) + (1 - alpha) CE, p = softmax(y / T)."""
    p_s, p_t = torch.softmax(y_s / T, 1), torch.softmax(y_t / T, 1)
    kl = sum((p_t[i] * (p_t[i].log() - p_s[i].log())).sum() for i in range(len(y_s))) / len(y_s)
    ce = -sum(torch.log_softmax(y_s[i], 0)[labels[i]] for i in range(len(y_s))) / len(y_s)
    return alpha * T ** 2 * kl + (1 - alpha) * ce


def dkd_by_hand(y_s, y_t, labels, T, alpha=1.0, beta=8.0):
    """CE + T^2 mean_i (alpha KL(b_t || b_s) + beta KL(q_t || q_s)): b the (target, rest)
    probabilities, q the distribution over the classes other than the target."""
    tckd = nckd = ce = 0
    for i, c in enumerate(labels.tolist()):
        p_s, p_t = torch.softmax(y_s[i] / T, 0), torch.softmax(y_t[i] / T, 0)
        b_s, b_t = torch.stack([p_s[c], 1 - p_s[c]]), torch.stack([p_t[c], 1 - p_t[c]])
        others = [k for k in range(len(p_s)) if k != c]
        q_s, q_t = p_s[others] / p_s[others].sum(), p_t[others] / p_t[others].sum()
        tckd = tckd + (b_t * (b_t / b_s).log()).sum()
        nckd = nckd + (q_t * (q_t / q_s).log()).sum()
        ce = ce - torch.log_softmax(y_s[i], 0)[c]
    return (T ** 2 * (alpha * tckd + beta * nckd) + ce) / len(labels)


@pytest.mark.parametrize('method', ['kd', 'dkd'])
def test_the_temperature_ascends_the_loss_that_the_student_descends(method):
    """Through the run's objective: the terms are those of the formula at T = 1 + 20 sigmoid(p);
    the student's logits get the formula's gradient at that T, and p gets -lambda_e dL/dT dT/dp."""
    given = {'alpha': 0.9} if method == 'kd' else {'dkd_beta': 1, 'dkd_warmup': 0}
    by_hand = kd_by_hand if method == 'kd' else dkd_by_hand
    opt = options(ctkd=True, ctkd_decay_epochs=4, seed=3, **given)
    objective, params = join_networks(opt, *wrn_pair())
    params = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in params.items()}
    p = params['aux.ctkd.global_t']
    assert p.tolist() == [1.0]  # the authors' start
    with torch.no_grad():
        p.fill_(0.3)
    objective.epoch = 3
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 3])
    y_s, terms = objective(x, y, params, True)
    weights = objective.weights(3, [])
    assert weights['ctkd'] == 0
    loss = sum(weights[kind(n)] * v for n, v in terms.items())
    y_t = objective.teacher_outputs(x, y, params).logits
    s = torch.sigmoid(torch.tensor(0.3, dtype=torch.float64))
    T = (1 + 20 * s).detach().requires_grad_()
    expected = by_hand(y_s, y_t, y, T)
    assert terms['ctkd'].item() == pytest.approx(T.item(), rel=1e-15)  # logged: the temperature in use
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    grad_p, grad_logits = torch.autograd.grad(loss, [p, y_s])
    dL_dT, dL_dlogits = torch.autograd.grad(expected, [T, y_s])
    torch.testing.assert_close(grad_logits, dL_dlogits, rtol=1e-10, atol=1e-14)  # the student: not reversed
    strength = ctkd.reversal_strength(3, 0, 1, 4)  # (1 - cos(3 pi / 4)) / 2
    assert grad_p.item() == pytest.approx(-strength * dL_dT.item() * 20 * s * (1 - s), rel=1e-9)
    assert dL_dT.abs() > 1e-6  # the check above has something to check

    with torch.no_grad():  # evaluation: the same temperature, no term of its own
        y_eval, evaluated = objective(x, y, params, False)
        assert 'ctkd' not in evaluated
        tested = sum(weights[kind(n)] * v for n, v in evaluated.items())
        assert tested.item() == pytest.approx(by_hand(y_eval, y_t, y, T).item(), rel=1e-12)


def test_the_run_hands_it_each_epoch_and_a_resumed_run_goes_on_with_it(image_tree, tmp_path):
    """cifar.py: the reversal strength is read at the epoch being trained, the resumed epoch too,
    and the resumed run ends bitwise where the straight one does; the log has the temperature."""
    ok(run_in_process(cifar.main, *TINY, '--width', 0.5, '--epochs', 1, '--seed', 1, '--dataroot', image_tree,
                      '--save', 'logs/teacher', cwd=tmp_path))
    common = [*TINY, '--width', 0.25, '--seed', 2, '--dataroot', image_tree, '--teacher_id', 'teacher',
              '--alpha', 0.9, '--ctkd', '--ctkd_decay_epochs', 2, '--precision', 'fp32', '--reference']
    seen = []
    strength = ctkd.reversal_strength

    def recording(epoch, *args):
        seen.append(epoch)
        return strength(epoch, *args)
    with mock.patch.object(ctkd, 'reversal_strength', recording):
        ok(run_in_process(cifar.main, *common, '--epochs', 2, '--save', 'logs/straight', cwd=tmp_path))
        assert sorted(set(seen)) == [1, 2]
        ok(run_in_process(cifar.main, *common, '--epochs', 1, '--save', 'logs/split', cwd=tmp_path))
        seen.clear()
        ok(run_in_process(cifar.main, *common, '--epochs', 2, '--save', 'logs/split', '--resume',
                          'logs/split/model.pt7', cwd=tmp_path))
        assert set(seen) == {2}
    a, b = checkpoint(tmp_path / 'logs/straight'), checkpoint(tmp_path / 'logs/split')
    for k in a['params']:
        assert torch.equal(a['params'][k], b['params'][k]), k
    assert 'aux.ctkd.global_t' in a['params']
    for r in log_lines(tmp_path / 'logs/straight'):
        mean, std = r['ctkd_loss']
        assert 1 < mean < 21 and std >= 0
        assert r['loss_weights'] == {'distillation': 1, 'at': 0, 'ctkd': 0} and r['ctkd'] is True


def refusal(**given):
    opt = options(**given)
    with pytest.raises(UserError) as e:
        check_transfer_options(opt, given.pop('has_teacher', True), '--teacher_id')
    return str(e.value)


def test_what_it_cannot_train_is_refused_in_one_line():
    assert '--ctkd compares the student with a teacher' in refusal(ctkd=True, alpha=0.9, has_teacher=False)
    assert 'neither is on' in refusal(ctkd=True)  # KD at alpha 0 and no DKD: no temperature to learn
    assert 'is above --ctkd_lambda_max' in refusal(ctkd=True, alpha=0.9, ctkd_lambda_min=2)
    assert 'add --ctkd' in refusal(ctkd_lambda_max=2, alpha=0.9)
    for flag, bad in (('ctkd_decay_epochs', 0), ('ctkd_t_min', 0), ('ctkd_t_span', -1), ('ctkd_lambda_max', -1)):
        with pytest.raises(UserError):
            check_option(flag, bad, methods.rules())
    context = SimpleNamespace(has_teacher=True, torchrun=False)
    ctkd.METHOD.refuse(options(ctkd=True, dkd_beta=1), context)  # DKD alone is enough
    ctkd.METHOD.refuse(options(ctkd=True, kd_beta=1), context)


def test_its_columns_are_the_authors_scripts():
    row = {m.pop('name'): m for m in methods.cohort('crd', 'wrn_40_2', 'wrn_16_2', [1])}
    assert row['ctkd_seed1'] == {'seed': 1, 'alpha': 0.9, 'ctkd': True}
    assert row['ctkd_dkd_seed1'] == {'seed': 1, 'dkd_beta': 1, 'dkd_nckd': NCKD[('wrn_40_2', 'wrn_16_2')],
                                     'dkd_warmup': 0, 'ctkd': True}
    assert ctkd.METHOD.columns('table1', 'wrn_16_2', 'wrn_16_1') == {}

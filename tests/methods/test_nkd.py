"""NKD (methods/nkd.py): its loss against the paper's formula written out sample by sample and
class by class, in float64; what its two terms read of the logits; the teacher's mode; what it
refuses; its column and how summarize.py names it."""
import math
from types import SimpleNamespace

import pytest
import torch

import methods
import summarize
from engine.errors import UserError
from engine.rules import check_option
from methods.nkd import METHOD, nkd_loss


def logits(seed, shape=(5, 7), scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def softmax(values, T=1.0):
    exps = [math.exp(v / T) for v in values]
    return [e / sum(exps) for e in exps]


def nkd_by_hand(y_s, y_t, labels, gamma, T):
    """mean_i [-p_t[y] log p_s[y] - gamma T^2 sum_{c != y} q_t,c log q_s,c], p at temperature 1 over
    every class, q at temperature T over the classes other than y (eq. 8)."""
    total = 0.0
    for zs, zt, y in zip(y_s.tolist(), y_t.tolist(), labels.tolist()):
        target = -softmax(zt)[y] * math.log(softmax(zs)[y])
        others_s, others_t = ([v for c, v in enumerate(z) if c != y] for z in (zs, zt))
        q_s, q_t = softmax(others_s, T), softmax(others_t, T)
        total += target - gamma * T ** 2 * sum(t * math.log(s) for s, t in zip(q_s, q_t))
    return total / len(labels)


@pytest.mark.parametrize('gamma, T', [(1.5, 1.0), (3.5, 3.0), (1.0, 4.0), (0.0, 2.0)])
def test_nkd_is_its_formula_written_out(gamma, T):
    y_s, y_t = logits(0), logits(1, scale=4)
    labels = torch.tensor([0, 6, 3, 3, 1])
    expected = nkd_by_hand(y_s, y_t, labels, gamma, T)
    assert abs(nkd_loss(y_s, y_t, labels, gamma, T).item() - expected) < 1e-12 * abs(expected)


def test_the_non_target_term_ignores_the_labelled_logit_and_the_target_term_the_others():
    """The student's labelled logit reaches only the target term; its other logits reach the
    target term only through the target's probability. The teacher gets no gradient."""
    y_s, y_t, labels = logits(2).requires_grad_(), logits(3, scale=3).requires_grad_(), torch.tensor([1, 0, 4, 6, 2])
    non_target = nkd_loss(y_s, y_t, labels, 2.0, 3.0) - nkd_loss(y_s, y_t, labels, 0.0, 3.0)
    grad, = torch.autograd.grad(non_target, y_s)
    assert grad.gather(1, labels[:, None]).abs().max() < 1e-15 and grad.abs().sum() > 0
    shifted = y_s.detach().clone()
    shifted[torch.arange(5), labels] += 1.7  # only the labelled class moves
    target_only = nkd_loss(shifted, y_t, labels, 2.0, 3.0) - nkd_loss(shifted, y_t, labels, 0.0, 3.0)
    torch.testing.assert_close(target_only, non_target.detach(), rtol=1e-13, atol=0)
    nkd_loss(y_s, y_t, labels, 2.0, 3.0).backward()
    assert y_t.grad is None and torch.isfinite(y_s.grad).all()


def test_the_teacher_trains_only_when_asked_and_the_term_is_on():
    assert METHOD.teacher_trains(SimpleNamespace(nkd_beta=1, nkd_teacher='train'))
    assert not METHOD.teacher_trains(SimpleNamespace(nkd_beta=1, nkd_teacher='eval'))
    assert not METHOD.teacher_trains(SimpleNamespace(nkd_beta=0, nkd_teacher='train'))


@pytest.mark.parametrize('flag, value, says', [('nkd_temperature', 0, 'is not positive'),
                                               ('nkd_gamma', -1, 'is negative'),
                                               ('nkd_teacher', 'training', 'is not one of the choices')])
def test_bad_settings_are_refused_in_one_line(flag, value, says):
    with pytest.raises(UserError) as refused:
        check_option(flag, value, methods.rules())
    assert f'--{flag}' in str(refused.value) and says in str(refused.value) and '\n' not in str(refused.value)


def test_its_column_and_its_name_in_summarize():
    row = methods.cohort('crd', 'wrn_40_2', 'wrn_16_2', [1])
    assert {'name': 'nkd_seed1', 'seed': 1, 'nkd_beta': 1, 'nkd_gamma': 3.5, 'nkd_temperature': 3} in row
    options = {**vars(methods.defaults()), 'init_epochs': 0, 'nkd_beta': 1, 'nkd_gamma': 3.5, 'nkd_temperature': 3}
    assert summarize.method_weights(options) == 'nkd_beta 1, nkd_gamma 3.5, nkd_temperature 3'

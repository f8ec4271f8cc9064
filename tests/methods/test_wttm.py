"""WTTM (methods/wttm.py): its loss against the paper's formula written out sample by sample and
class by class, in float64; what the power weighting does at its ends; what it refuses; its column
and how summarize.py names it."""
import math

import pytest
import torch
import torch.nn.functional as F

import methods
import summarize
from engine.errors import UserError
from engine.rules import check_option
from methods.wttm import wttm_loss


def logits(seed, shape=(5, 7), scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def wttm_by_hand(y_s, y_t, gamma):
    """mean_i U_i sum_c q_ic log(q_ic / p_s,ic), q_i = p_t,i^gamma / U_i, U_i = sum_c p_t,ic^gamma (eq. 16)."""
    total = 0.0
    for zs, zt in zip(y_s.tolist(), y_t.tolist()):
        p_s = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
        p_t = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
        u = sum(p ** gamma for p in p_t)
        q = [p ** gamma / u for p in p_t]
        total += u * sum(qc * math.log(qc / ps) for qc, ps in zip(q, p_s))
    return total / len(y_s)


@pytest.mark.parametrize('gamma', [0.1, 0.2, 0.5, 1.0, 2.0])
def test_wttm_is_its_formula_written_out(gamma):
    y_s, y_t = logits(0), logits(1, scale=4)
    expected = wttm_by_hand(y_s, y_t, gamma)
    assert abs(wttm_loss(y_s, y_t, gamma).item() - expected) < 1e-12 * abs(expected)


def test_its_ends_kd_at_temperature_1_and_a_weight_that_grows_with_the_teachers_flatness():
    """gamma 1: U = 1 and the term is KD's KL at temperature 1 (zero for a student that predicts as
    its teacher). A uniform teacher has U = C^(1 - gamma), the largest weight; a near one-hot teacher
    has U near 1."""
    y_s, y_t = logits(2), logits(3, scale=3)
    kl = F.kl_div(F.log_softmax(y_s, 1), F.softmax(y_t, 1), reduction='batchmean')
    torch.testing.assert_close(wttm_loss(y_s, y_t, 1.0), kl, rtol=1e-13, atol=0)
    assert wttm_loss(y_t, y_t, 1.0).abs() < 1e-14
    gamma, classes = 0.2, y_s.shape[1]
    uniform = torch.zeros_like(y_t)
    kl_uniform = F.kl_div(F.log_softmax(y_s, 1), F.softmax(uniform, 1), reduction='batchmean')
    torch.testing.assert_close(wttm_loss(y_s, uniform, gamma), classes ** (1 - gamma) * kl_uniform, rtol=1e-13, atol=0)
    one_hot = F.one_hot(torch.arange(len(y_s)) % classes, classes).double() * 400
    kl_one_hot = F.kl_div(F.log_softmax(y_s, 1), F.softmax(one_hot, 1), reduction='batchmean')
    torch.testing.assert_close(wttm_loss(y_s, one_hot, gamma), kl_one_hot, rtol=1e-9, atol=0)


def test_the_teacher_gets_no_gradient_and_the_student_a_finite_one():
    y_s, y_t = logits(4).requires_grad_(), logits(5, scale=50).requires_grad_()  # p_t underflows far from its max
    wttm_loss(y_s, y_t.detach(), 0.2).backward()
    assert torch.isfinite(y_s.grad).all() and y_s.grad.abs().sum() > 0 and y_t.grad is None


@pytest.mark.parametrize('value', [0, -0.5])
def test_a_gamma_that_is_not_positive_is_refused_in_one_line(value):
    with pytest.raises(UserError) as refused:
        check_option('wttm_gamma', value, methods.rules())
    assert '--wttm_gamma' in str(refused.value) and '\n' not in str(refused.value)


def test_its_column_and_its_name_in_summarize():
    row = methods.cohort('crd', 'resnet32x4', 'resnet8x4', [1])
    assert {'name': 'wttm_seed1', 'seed': 1, 'wttm_beta': 4, 'wttm_gamma': 0.2} in row
    options = {**vars(methods.defaults()), 'init_epochs': 0, 'wttm_beta': 4, 'wttm_gamma': 0.1}
    assert summarize.method_weights(options) == 'wttm_beta 4, wttm_gamma 0.1'

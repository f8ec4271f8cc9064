import math

import torch

from utils import at, at_loss, distillation, flatten, cast, print_tensor_dict


def test_attention_map_is_normalised_channel_mean_of_squares():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    a = at(x)
    assert a.shape == (3, 24)
    for b in range(3):
        q = [sum(x[b, c, i, j] ** 2 for c in range(5)) / 5 for i in range(4) for j in range(6)]
        norm = math.sqrt(sum(v ** 2 for v in q))
        torch.testing.assert_close(a[b], torch.tensor(q, dtype=torch.float64) / norm)
        assert abs(a[b].norm().item() - 1) < 1e-12


def test_attention_map_ignores_channel_count_and_scale():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(at(3 * x), at(x))
    torch.testing.assert_close(at(torch.cat([x, x], 1)), at(x))


def test_at_loss_is_mean_squared_difference_of_maps():
    torch.manual_seed(2)
    s, t = torch.randn(4, 8, 5, 5), torch.randn(4, 16, 5, 5)
    expected = ((at(s) - at(t)) ** 2).sum() / (4 * 25)
    torch.testing.assert_close(at_loss(s, t), expected)
    assert at_loss(t, t).item() == 0
    s.requires_grad_(True)
    at_loss(s, t).backward()
    assert s.grad.abs().sum() > 0


def test_distillation_against_its_formula():
    torch.manual_seed(3)
    y, t = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    T, alpha = 4.0, 0.9
    kl, ce = 0.0, 0.0
    for b in range(6):
        p_t = torch.softmax(t[b] / T, 0)
        p_s = torch.softmax(y[b] / T, 0)
        kl += (p_t * (p_t.log() - p_s.log())).sum() / 6
        ce += -torch.log_softmax(y[b], 0)[labels[b]] / 6
    expected = alpha * T * T * kl + (1 - alpha) * ce
    torch.testing.assert_close(distillation(y, t, labels, T, alpha), expected)
    # alpha = 0 is plain cross-entropy; identical logits give zero KL
    torch.testing.assert_close(distillation(y, t, labels, T, 0.0), ce)
    torch.testing.assert_close(distillation(y, y, labels, T, 1.0), torch.zeros((), dtype=torch.float64))


def test_flatten_keeps_order_and_drops_none():
    nested = {'conv0': 1, 'group0': {'block0': {'conv0': 2, 'convdim': None, 'bn0': {'weight': 3}}}, 'fc': {'bias': 4}}
    assert list(flatten(nested).items()) == [('conv0', 1), ('group0.block0.conv0', 2),
                                             ('group0.block0.bn0.weight', 3), ('fc.bias', 4)]


def test_cast_keeps_requires_grad_and_integer_types():
    p = {'w': torch.ones(2, requires_grad=True), 'rm': torch.zeros(2), 'n': torch.tensor(3)}
    c = cast(p, 'double')
    assert c['w'].dtype == torch.float64 and c['w'].requires_grad and c['w'].is_leaf
    assert not c['rm'].requires_grad and c['n'].dtype == torch.int64


def test_parameter_table_lists_every_tensor(capsys):
    print_tensor_dict({'conv0': torch.zeros(16, 3, 3, 3), 'bn.running_mean': torch.zeros(16)}, 448)
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith('  ')]
    assert len(rows) == 2 and '16x3x3x3' in rows[0] and 'float32' in rows[1] and '(no grad)' in rows[1]
    assert 'Total number of parameters: 448' in printed

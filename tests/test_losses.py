"""Each transfer loss against its formula, written out element by element on small tensors."""
import math

import torch
import torch.nn.functional as F

from methods.at import at, at_loss, at_loss_paper
from methods.cosine import cosine_loss
from methods.formulas import feature_distance, input_gradient
from methods.grad_at import input_gradient_loss
from methods.kd import distillation
from methods.symmetry import symmetry_loss


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


def test_attention_map_power_p_uses_absolute_values():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for p in (1, 2, 4, 1.5):
        q = x.abs().pow(p).sum(1).flatten(1)
        torch.testing.assert_close(at(x, p), q / q.norm(dim=1, keepdim=True))
    assert not torch.allclose(at(x, 1), at(x, 4))


def test_paper_form_is_per_sample_l2_norm_of_map_difference():
    torch.manual_seed(5)
    s, t = torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 8, 5, 5, dtype=torch.float64)
    for p in (1, 2):
        norms = [math.sqrt(((at(s, p)[b] - at(t, p)[b]) ** 2).sum().item()) for b in range(3)]
        assert abs(at_loss_paper(s, t, p).item() - sum(norms) / 3) < 1e-12
        assert abs(at_loss(s, t, p).item() - sum(n * n for n in norms) / (3 * 25)) < 1e-12


def test_input_gradient_is_each_samples_own_loss_gradient():
    """For logits W x the cross-entropy's input gradient is W^T (softmax(Wx) - onehot(y))."""
    torch.manual_seed(6)
    w = torch.randn(4, 6, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    j = input_gradient(x @ w.T, y, x)
    expected = (torch.softmax(x @ w.T, 1) - F.one_hot(y, 4).double()) @ w
    torch.testing.assert_close(j, expected.detach())
    # one sample alone has the same gradient as inside the batch
    x0 = x[:1].detach().requires_grad_()
    torch.testing.assert_close(input_gradient(x0 @ w.T, y[:1], x0), j[:1])


def test_input_gradient_losses_against_their_formulas():
    torch.manual_seed(7)
    j_s, j_t = torch.randn(3, 3, 4, 5, dtype=torch.float64), torch.randn(3, 3, 4, 5, dtype=torch.float64)
    norms = [math.sqrt(((j_s[b] - j_t[b]) ** 2).sum().item()) for b in range(3)]
    assert abs(input_gradient_loss(j_s, j_t).item() - sum(norms) / 3) < 1e-12
    mirrored = j_s[..., torch.arange(4, -1, -1)]  # columns in reverse: the left-right mirror image
    norms = [math.sqrt(((j_s[b] - mirrored[b]) ** 2).sum().item()) for b in range(3)]
    assert abs(symmetry_loss(j_s).item() - sum(norms) / 3) < 1e-12
    assert symmetry_loss(j_s + mirrored).item() < 1e-12  # a mirror-symmetric gradient costs nothing


def test_feature_distance_is_mean_squared_difference():
    torch.manual_seed(8)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    expected = sum((s[b, c, i, j] - t[b, c, i, j]) ** 2 for b in range(2) for c in range(3)
                   for i in range(4) for j in range(4)) / (2 * 3 * 16)
    torch.testing.assert_close(feature_distance(s, t), expected)
    assert feature_distance(t.bfloat16(), t.bfloat16()).dtype == torch.float32


def test_cosine_loss_pools_space_then_teacher_channels():
    torch.manual_seed(9)
    s, t = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, 4, dtype=torch.float64)
    u = s.mean((2, 3))
    v = t.mean((2, 3))
    v = torch.stack([(v[:, 0] + v[:, 1]) / 2, (v[:, 2] + v[:, 3]) / 2], 1)  # adjacent channel pairs
    cos = [(u[b] @ v[b]) / (u[b].norm() * v[b].norm()) for b in range(3)]
    assert abs(cosine_loss(s, t).item() - sum(1 - c.item() for c in cos) / 3) < 1e-12
    assert cosine_loss(s, 5 * s).item() < 1e-12  # scale does not matter, direction does
    assert abs(cosine_loss(s, -s).item() - 2) < 1e-12

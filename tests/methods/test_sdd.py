"""SDD (methods/sdd.py): its region logits and its loss against the paper's formula written out
region by region and sample by sample, in float64; its refusal of standardised logits."""
import argparse
import math

import pytest
import torch

from engine.errors import UserError
from methods.sdd import METHOD, region_logits, sdd_loss


def draw(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_region_logits_are_the_classifier_on_each_regions_mean():
    """Scale 1 is the whole 8x8 map's mean, scale 2 its four 4x4 quarters row by row, scale 4 its
    sixteen 2x2 blocks; each scored by W f + b."""
    f, w, bias = draw(0, 2, 3, 8, 8), draw(1, 5, 3), draw(2, 5)
    z = region_logits(f, w, bias, [1, 2, 4])
    assert z.shape == (1 + 4 + 16, 2, 5)
    regions = [f.mean((2, 3))]
    for m in (2, 4):
        side = 8 // m
        regions += [f[:, :, i * side:(i + 1) * side, j * side:(j + 1) * side].mean((2, 3))
                    for i in range(m) for j in range(m)]
    for r, mean in enumerate(regions):
        torch.testing.assert_close(z[r], mean @ w.T + bias, rtol=1e-12, atol=1e-12)


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def softmax(z, T):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def dkd(z_s, z_t, y, alpha, beta, T):
    """DKD (Zhao et al. 2022, eq. 7) of one sample: T^2 (alpha KL(b_t || b_s) + beta KL(n_t || n_s))."""
    p_s, p_t = softmax(z_s, T), softmax(z_t, T)
    binary = kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
    others = [c for c in range(len(z_s)) if c != y]
    n_s = softmax([z_s[c] for c in others], T)
    n_t = softmax([z_t[c] for c in others], T)
    return T ** 2 * (alpha * binary + beta * kl(n_t, n_s))


@pytest.mark.parametrize('loss', ['dkd', 'kd'])
def test_sdd_is_its_formula_written_out(loss):
    """1/(R B) sum_i sum_r w_ir L(z_s, z_t, y), w_ir 2 where the teacher's region r is right and
    its global region wrong (or the reverse), else 1."""
    R, B, K, T = 5, 3, 4, 2.0
    z_s, z_t = draw(3, R, B, K), draw(4, R, B, K)
    labels = torch.tensor([0, 1, 2])
    # Sample 0: globally right, region 2 wrong; sample 1: globally wrong, region 3 right.
    z_t[0, 0, 0], z_t[2, 0, 0], z_t[2, 0, 1] = 9.0, -9.0, 9.0
    z_t[0, 1, 1], z_t[0, 1, 3], z_t[3, 1, 1] = -9.0, 9.0, 9.0
    right = (z_t.argmax(2) == labels).tolist()
    total, complementary = 0.0, 0
    for r in range(R):
        for i in range(B):
            zs, zt, y = z_s[r, i].tolist(), z_t[r, i].tolist(), int(labels[i])
            value = dkd(zs, zt, y, 1.5, 6.0, T) if loss == 'dkd' else T ** 2 * kl(softmax(zt, T), softmax(zs, T))
            w = 1.0 if right[r][i] == right[0][i] else 3.0
            complementary += w == 3.0
            total += w * value
    assert complementary >= 2
    got = sdd_loss(z_s, z_t, labels, T, loss, 1.5, 6.0, complementary=3.0)
    assert abs(got.item() - total / (R * B)) < 1e-12 * total
    assert sdd_loss(z_t, z_t, labels, T, loss, 1.5, 6.0).abs() < 1e-12  # a student that scores as its teacher


def test_sdd_at_scale_1_is_the_logit_loss_of_the_logits():
    from methods.dkd import dkd_loss
    z_s, z_t, labels = draw(5, 1, 6, 10), draw(6, 1, 6, 10), torch.arange(6)
    torch.testing.assert_close(sdd_loss(z_s, z_t, labels, 4.0, 'dkd', 1.0, 8.0), dkd_loss(z_s[0], z_t[0], labels),
                               rtol=1e-12, atol=0)


def test_sdd_refuses_standardised_logits_in_one_line():
    o = argparse.Namespace(sdd_beta=1, logit_stand=True)
    with pytest.raises(UserError, match='^--logit_stand .*; drop --logit_stand or --sdd_beta$'):
        METHOD.refuse(o, None)

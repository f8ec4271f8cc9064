"""Relational KD (Park et al., CVPR 2019, eq. 4-7) on the pooled features: the batch's distance
and angle relations of the student against the teacher's,

    rkd_beta * (w_d * Huber(psi_D(s), psi_D(t)) + w_a * Huber(psi_A(s), psi_A(t)))

psi_D the pairwise distances, each network's divided by their mean over pairs i != j; psi_A the
cosines of the angles at every vertex j of every triangle (i, j, k); Huber the smooth L1 with
delta 1, averaged over the b^2 pairs and b^3 triples. RepDistiller's weights: 1, with w_d 25 and
w_a 50.
"""
import torch
import torch.nn.functional as F

from methods.base import Method, Reference, not_negative, setting, weight
from methods.formulas import at_least_fp32


def pairwise_distance(e, eps=1e-12):
    """Euclidean distances between the rows of e, zero on the diagonal. The squared distance is
    clamped at eps before the square root, which keeps the root's gradient finite where two
    samples coincide."""
    square = e.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_loss(e_s, e_t, w_d=25, w_a=50):
    """The teacher's relations are fixed targets (no gradient), as in the reference."""
    s, t = at_least_fp32(e_s).flatten(1), at_least_fp32(e_t).flatten(1).detach()
    n = len(s)
    d_s, d_t = pairwise_distance(s), pairwise_distance(t)
    # the clamp makes every off-diagonal distance positive, so this is the mean over i != j
    distance = F.smooth_l1_loss(d_s / (d_s.sum() / (n * (n - 1))), d_t / (d_t.sum() / (n * (n - 1))))

    def cosines(e):
        u = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # u[j, i] = unit vector e_i - e_j
        return u @ u.transpose(1, 2)
    return w_d * distance + w_a * F.smooth_l1_loss(cosines(s), cosines(t))


class RKD(Method):
    name, title, order = 'rkd', 'RKD', 80
    references = {'rkd': Reference('RepDistiller', ('--distill', 'rkd', '-r', 1, '-a', 0, '-b', 1))}
    flags = (
        weight('rkd_beta', 'relational KD: B * RKD (distance and angle) between the pooled features'),
        setting('rkd_w_d', 25, "weight of RKD's distance term",
                not_negative('use 0 (off) or a positive weight, e.g. 25'), type=float),
        setting('rkd_w_a', 50, "weight of RKD's angle term",
                not_negative('use 0 (off) or a positive weight, e.g. 50'), type=float),
    )
    reads = ('pooled',)
    examples = {'RKD': {'rkd_beta': 1}}

    def terms(self, b):
        return {'rkd': rkd_loss(b.s.pooled, b.t.pooled, b.opt.rkd_w_d, b.opt.rkd_w_a)}

    def columns(self, table, teacher, student):
        return {'rkd': {'rkd_beta': 1}} if table == 'crd' else {}


METHOD = RKD()

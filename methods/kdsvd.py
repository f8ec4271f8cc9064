"""KD with singular value decomposition (Lee et al., "Self-supervised Knowledge Distillation Using
Singular Value Decomposition", ECCV 2018), as RepDistiller's KDSVD computes it, over every pair
of consecutive groups:

    kdsvd_beta * sum_(g, g+1) sum (R_s - R_t)^2 / b,   R = exp(-(v_c - v'_c')^2 / 8)

each group summarised by the teacher's first k right singular vectors v (of each sample's
positions x channels matrix) and the student's among its first k + 3 best aligned with each,
both scaled by the teacher's normalised singular values. Student and teacher groups need equal
channel counts. RepDistiller gives no weight; 1 is mdistiller's (beside cross-entropy 1).
"""
import math

import torch
import torch.nn.functional as F

from engine.errors import UserError
from methods.base import Method, Reference, at_least_one, setting, weight
from methods.formulas import at_least_fp32
from methods.parts import equal_widths


class FiniteGradient(torch.autograd.Function):
    """Identity whose gradient has non-finite entries replaced by 0. The SVD's backward divides
    by differences of squared singular values, all of them, also of the vectors KDSVD discards
    (whose gradient is 0): repeated or vanishing ones give 0 * inf = NaN, which would end the run."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def right_singular_vectors(f, n):
    """The first n right singular vectors of each sample's (positions x channels) matrix, each
    L2-normalised over channels, and the first n singular values normalised to unit length."""
    x = at_least_fp32(f).flatten(2).transpose(1, 2)
    # LAPACK refuses non-finite input with an exception; a diverged student must instead give a
    # non-finite loss, which stops its run at its last good checkpoint (and lets a cohort go on).
    finite = torch.isfinite(x).flatten(1).all(1)[:, None, None]
    _, sigma, vh = torch.linalg.svd(FiniteGradient.apply(torch.where(finite, x, 0.0)), full_matrices=False)
    vh, sigma = torch.where(finite, vh, math.nan), torch.where(finite[:, 0], sigma, math.nan)
    return F.normalize(vh[:, :n].transpose(1, 2), dim=1), F.normalize(sigma[:, :n], dim=1)


def kdsvd_loss(groups_s, groups_t, k=1):
    terms, previous = [], None
    for f_s, f_t in zip(groups_s, groups_t):
        v_t, sigma_t = right_singular_vectors(f_t, k)
        v_s, _ = right_singular_vectors(f_s, k + 3)
        cosine = v_s.transpose(1, 2) @ v_t  # (B, k + 3, k)
        best = cosine.abs() == cosine.abs().amax(1, keepdim=True)
        v_s = v_s @ torch.where(best, cosine.sign(), torch.zeros_like(cosine))
        v_s, v_t = v_s * sigma_t[:, None], v_t * sigma_t[:, None]
        if previous is not None:
            rbf_s = torch.exp(-(v_s[:, :, None] - previous[0][:, None]).pow(2) / 8)
            rbf_t = torch.exp(-(v_t[:, :, None] - previous[1][:, None]).pow(2) / 8)
            term = (rbf_s - rbf_t.detach()).pow(2)
            # a degenerate decomposition (repeated singular values) gives no usable direction
            terms.append(torch.where(torch.isfinite(term), term, torch.zeros_like(term)).sum() / len(f_s))
        previous = v_s, v_t
    return sum(terms)


class KDSVD(Method):
    name, title, order = 'kdsvd', 'KDSVD', 110
    references = {'kdsvd': Reference('RepDistiller', ('--distill', 'kdsvd', '-r', 1, '-a', 0, '-b', 1))}
    flags = (
        weight('kdsvd_beta', "SVD distillation: B * KDSVD over consecutive groups' singular vectors"),
        setting('kdsvd_k', 1, 'singular vectors KDSVD compares per group',
                at_least_one('compare at least one singular vector, e.g. 1')),
    )
    examples = {'KDSVD': {'kdsvd_beta': 1}}

    def refuse_pair(self, o, nets):
        equal_widths(nets.s.groups, nets.t.groups, 'kdsvd_beta', 'KDSVD')
        # each sample's (positions x channels) matrix has as many singular vectors as its smaller side
        rank = min(min(g.shape[1], g.shape[2] * g.shape[3]) for g in (*nets.s.groups, *nets.t.groups))
        if o.kdsvd_k + 3 > rank:
            fix = f'use --kdsvd_k {rank - 3} or less' if rank > 3 else 'pick networks with larger groups'
            raise UserError(f'--kdsvd_k {o.kdsvd_k} searches the student\'s first {o.kdsvd_k + 3} singular vectors '
                            f'of each group, and a group of these networks has {rank}; {fix}')

    def terms(self, b):
        return {'kdsvd': kdsvd_loss(b.s.groups, b.t.groups, b.opt.kdsvd_k)}

    def columns(self, table, teacher, student):
        return {'kdsvd': {'kdsvd_beta': 1}} if table == 'crd' else {}


METHOD = KDSVD()

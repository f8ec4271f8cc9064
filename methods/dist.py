"""DIST (Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS
2022): the relations of the student's and the teacher's softened predictions, Y = softmax(z / tau)
of a batch (B x C), matched by Pearson correlation rather than exactly (eq. 5-9):

    dist_beta * tau^2 * (dist_inter * (1 - mean_i rho(Y_s[i, :], Y_t[i, :]))     inter-class, each sample
                         + dist_intra * (1 - mean_c rho(Y_s[:, c], Y_t[:, c])))  intra-class, each class

rho the Pearson correlation (the cosine of the centred vectors), beside the cross-entropy. The
paper's beta, gamma and tau are --dist_inter, --dist_intra and --dist_tau, 1 by default as in
torchdistill's DISTLoss, which computes the same (the authors' code is image_classification_sota's
dist_kd.py); the benchmark column uses the defaults.
"""
import torch.nn.functional as F

from engine.rules import NUMBER, Rule
from methods.base import Method, Reference, positive, setting, weight
from methods.formulas import at_least_fp32

EPS = 1e-8  # of the cosine's norms, as the authors' code


def pearson(a, b, eps=EPS):
    """The Pearson correlation of each row of a with the same row of b."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), dim=1, eps=eps)


def dist_loss(y_s, y_t, inter=1.0, intra=1.0, tau=1.0):
    """inter * tau^2 * (1 - mean rho over samples) + intra * tau^2 * (1 - mean rho over classes)."""
    p_s, p_t = F.softmax(at_least_fp32(y_s) / tau, dim=1), F.softmax(at_least_fp32(y_t) / tau, dim=1)
    inter_class = 1 - pearson(p_s, p_t).mean()
    intra_class = 1 - pearson(p_s.T, p_t.T).mean()
    return tau ** 2 * (inter * inter_class + intra * intra_class)


class DIST(Method):
    name, title, order = 'dist', 'DIST', 230
    # torchdistill's DISTLoss beside its cross-entropy, as its ILSVRC 2012 sample configures them.
    references = {'dist': Reference('torchdistill', (
        'dist.criterion.key', 'DISTLoss', 'dist.criterion.kwargs.student_module_path', '.',
        'dist.criterion.kwargs.student_module_io', 'output', 'dist.criterion.kwargs.teacher_module_path', '.',
        'dist.criterion.kwargs.teacher_module_io', 'output', 'dist.criterion.kwargs.beta', '{dist_inter}',
        'dist.criterion.kwargs.gamma', '{dist_intra}', 'dist.criterion.kwargs.tau', '{dist_tau}',
        'dist.weight', '{dist_beta}'))}
    flags = (
        weight('dist_beta', 'DIST: B * tau^2 * (inter * inter-class + intra * intra-class relation of the softened '
                            'predictions, each 1 - mean Pearson correlation)'),
        setting('dist_inter', 1, "DIST's weight of the inter-class relation (the paper's beta)",
                Rule(NUMBER, lambda v: v >= 0, 'is negative', 'use 0 (off) or a positive weight, e.g. 1'), type=float),
        setting('dist_intra', 1, "DIST's weight of the intra-class relation (the paper's gamma)",
                Rule(NUMBER, lambda v: v >= 0, 'is negative', 'use 0 (off) or a positive weight, e.g. 1'), type=float),
        setting('dist_tau', 1, "DIST's temperature of the predictions (the paper's tau)",
                positive("DIST's temperature", 1), type=float),
    )
    examples = {'DIST': {'dist_beta': 1}}

    def terms(self, b):
        o = b.opt
        return {'dist': dist_loss(b.s.logits, b.t.logits, o.dist_inter, o.dist_intra, o.dist_tau)}

    def columns(self, table, teacher, student):
        return {'dist': {'dist_beta': 1}} if table == 'crd' else {}


METHOD = DIST()

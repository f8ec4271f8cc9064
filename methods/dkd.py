"""Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022, eq. 7), mdistiller's:

    dkd_beta * min(epoch / dkd_warmup, 1) * T^2 (dkd_alpha * TCKD + dkd_nckd * NCKD)

TCKD the KL between the binary (target class, all others) distributions of teacher and student,
NCKD the KL between their distributions over the non-target classes alone, both at --temperature
(with --ctkd, a learned one) and averaged over the batch; --logit_stand z-scores both logits first.
DKD's own alpha and beta are --dkd_alpha and --dkd_nckd (--dkd_beta is the term's weight, as every
method's). mdistiller's CIFAR-100 settings: weight 1 beside cross-entropy 1, T 4, warm-up 20
epochs, beta 8 or its per-pair value.
"""
import torch
import torch.nn.functional as F

from engine.rules import INTEGER
from methods.base import Method, Reference, not_negative, setting, warmed_up, weight
from methods.formulas import at_least_fp32
from methods.kd import standardize_logits

# mdistiller's configs/cifar100/dkd/: its beta for the pairs it has a file for (8, its default, elsewhere).
NCKD = {('resnet56', 'resnet20'): 2, ('resnet110', 'resnet32'): 2, ('wrn_40_2', 'wrn_16_2'): 6,
        ('wrn_40_2', 'wrn_40_1'): 6, ('vgg13', 'vgg8'): 6, ('vgg13', 'MobileNetV2'): 6}


def dkd_loss(y_s, y_t, labels, alpha=1.0, beta=8.0, T=4.0, standardize=False):
    if standardize:
        y_s, y_t = standardize_logits(y_s), standardize_logits(y_t)
    z_s, z_t = at_least_fp32(y_s) / T, at_least_fp32(y_t) / T
    target = F.one_hot(labels, z_s.shape[1]).bool()

    def log_probabilities(z):
        """log (p_target, 1 - p_target) and log p(class | not target), exactly 0 at the target."""
        others = z.masked_fill(target, float('-inf'))
        binary = torch.cat([z.gather(1, labels[:, None]), others.logsumexp(1, keepdim=True)], 1)
        return binary - z.logsumexp(1, keepdim=True), others.log_softmax(1).masked_fill(target, 0)
    b_s, n_s = log_probabilities(z_s)
    b_t, n_t = log_probabilities(z_t)
    tckd = (b_t.exp() * (b_t - b_s)).sum() / len(z_s)
    nckd = (n_t.exp().masked_fill(target, 0) * (n_t - n_s)).sum() / len(z_s)
    return T ** 2 * (alpha * tckd + beta * nckd)


class DKD(Method):
    name, title, order = 'dkd', 'DKD', 140
    # mdistiller's configuration overrides (its configs/cifar100/dkd/*.yaml set DKD.BETA per pair)
    references = {'dkd': Reference('mdistiller', ('DISTILLER.TYPE', 'DKD', 'DKD.CE_WEIGHT', 1.0, 'DKD.ALPHA',
                                                  '{dkd_alpha}', 'DKD.BETA', '{dkd_nckd}', 'DKD.T', '{temperature}',
                                                  'DKD.WARMUP', '{dkd_warmup}'))}
    flags = (
        weight('dkd_beta', 'decoupled KD: B * (alpha TCKD + nckd NCKD) at --temperature, warmed up linearly'),
        setting('dkd_alpha', 1, "DKD's weight of target-class KD (its alpha)",
                not_negative('use 0 (off) or a positive weight, e.g. 1'), type=float),
        setting('dkd_nckd', 8, "DKD's weight of non-target-class KD (its beta)",
                not_negative('use 0 (off) or a positive weight, e.g. 8'), type=float),
        setting('dkd_warmup', 20, 'epochs over which the DKD weight rises linearly to --dkd_beta (0: none)',
                not_negative('use the epochs over which DKD warms up, e.g. 20, or 0 for none', INTEGER),
                forward=None),  # a weight schedule, applied outside the forward
    )
    examples = {'DKD': {'dkd_beta': 1}}

    def terms(self, b):
        o = b.opt
        return {'dkd': dkd_loss(at_least_fp32(b.s.logits), at_least_fp32(b.t.logits), b.y, o.dkd_alpha, o.dkd_nckd,
                                b.temperature, standardize=o.logit_stand)}

    def uses_temperature(self, o):
        return True  # whenever it is on

    def weights(self, o, epoch, epoch_step, stage):
        return {'dkd': warmed_up(o.dkd_beta, o.dkd_warmup, epoch)}

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        return {'dkd': {'dkd_beta': 1, 'dkd_nckd': NCKD.get((teacher, student), 8), 'temperature': 4}}


METHOD = DKD()

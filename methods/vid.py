"""Variational information distillation (Ahn et al., CVPR 2019, eq. 6-8), as RepDistiller's
VIDLoss: on each pair of groups, the negative log likelihood of the teacher's group t under a
Gaussian whose mean is a learned regressor of the student's group (three 1x1 convolutions with
ReLUs between, as many middle channels as the teacher's group: 'aux.vid<g>.conv0..2') and whose
per-channel variance is softplus(log_scale) + eps ('aux.vid<g>.log_scale'), constant dropped:

    vid_beta * sum_g mean(((t - mu(s))^2 / var + log var) / 2)

A larger student group is average-pooled to the teacher's size before the regressor, a larger
teacher group to the student's. RepDistiller's weight: 1.
"""
import math

import torch
import torch.nn.functional as F

from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32, same_resolution
from methods.parts import torch_conv_weight

# RepDistiller's VIDLoss starts each channel's predicted variance at 5.
INITIAL_VARIANCE, EPS = 5.0, 1e-5


def vid_loss(mean, t, log_scale, eps=EPS):
    """One group pair: `mean` the regressor's output on the student group."""
    mean, t = same_resolution(mean, t)
    mean, t = at_least_fp32(mean), at_least_fp32(t)
    var = (F.softplus(at_least_fp32(log_scale)) + eps).view(-1, *[1] * (t.dim() - 2))
    return (0.5 * ((mean - t).pow(2) / var + var.log())).mean()


def regressor(x, params, base):
    """VID's mean of the teacher's group given the student's: 1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv."""
    o = F.relu(F.conv2d(x, params[base + '.conv0']))
    o = F.relu(F.conv2d(o, params[base + '.conv1']))
    return F.conv2d(o, params[base + '.conv2'])


class VID(Method):
    name, title, order = 'vid', 'VID', 130
    references = {'vid': Reference('RepDistiller', ('--distill', 'vid', '-r', 1, '-a', 0, '-b', 1), parts=(
        (r'aux\.vid(\d)\.conv(\d)', lambda m: f'criterion_list.2.{m[1]}.regressor.{2 * int(m[2])}.weight'),
        (r'aux\.vid(\d)\.log_scale', r'criterion_list.2.\1.log_scale')))}
    flags = (weight('vid_beta', "variational information distillation: B * VID on each group (learned regressors)"),)
    per_group = True
    examples = {'VID': {'vid_beta': 1}}

    def parts(self, o, nets, run):
        # softplus(log_scale) + eps is the variance: start it at INITIAL_VARIANCE
        log_scale = math.log(math.expm1(INITIAL_VARIANCE - EPS))
        parts = {}
        for g, (s, t) in enumerate(zip(nets.s.groups, nets.t.groups)):
            c_s, c_t = s.shape[1], t.shape[1]
            parts[f'vid{g}'] = {'conv0': torch_conv_weight(c_s, c_t), 'conv1': torch_conv_weight(c_t, c_t),
                                'conv2': torch_conv_weight(c_t, c_t), 'log_scale': torch.full((c_t,), log_scale)}
        return parts

    def terms(self, b):
        terms = {}
        for g, (s, t) in enumerate(zip(b.s.groups, b.t.groups)):
            s, t = same_resolution(s, t)  # RepDistiller pools the larger group first
            terms[f'vid{g}'] = vid_loss(regressor(s, b.params, f'aux.vid{g}'), t, b.params[f'aux.vid{g}.log_scale'])
        return terms

    def columns(self, table, teacher, student):
        return {'vid': {'vid_beta': 1}} if table == 'crd' else {}


METHOD = VID()

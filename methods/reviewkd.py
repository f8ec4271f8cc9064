"""Knowledge review (Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021), as
mdistiller trains it: the student's groups and its pooled feature (as a 1x1 map) are fused from
the deepest level up by learned attention-based fusion (ABF) modules ('aux.reviewkd.abf<i>'),
each level seeing every deeper one, and compared with the teacher's pre-ReLU groups and pooled
feature through the hierarchical context loss:

    reviewkd_beta * min(epoch / reviewkd_warmup, 1) * sum_i HCL(ABF_i, t_i)

mdistiller's CIFAR-100 weight: 5 for resnet32x4 -> resnet8x4 (its one file), 1 (its default)
elsewhere, warmed up over 20 epochs.
"""
import re

import torch
import torch.nn.functional as F

from engine.rules import INTEGER
from methods.base import Method, Reference, at_least_one, not_negative, setting, warmed_up, weight
from methods.formulas import at_least_fp32
from methods.parts import unit_bnparams
from utils import batch_norm

# mdistiller (and the authors' code) cap the fusion's width at 512 channels.
MAX_MID_CHANNELS = 512


def hcl_loss(fs, ft):
    """Hierarchical context loss (section 3.4), mdistiller's hcl_loss: for each pair of maps, the
    mean squared error at full size and after average pooling to 4x4, 2x2 and 1x1 (only the
    levels smaller than the map), weighted 1, 1/2, 1/4, 1/8 and divided by the weights' sum;
    summed over the pairs."""
    total = 0
    for s, t in zip(fs, ft):
        s, t = at_least_fp32(s), at_least_fp32(t)
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size < s.shape[2]:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
                weights += weight
        total = total + loss / weights
    return total


def abf_params(c_in, c_mid, c_out, fuse):
    """One ABF module: a 1x1 conv (no bias) and BN to c_mid channels, a 3x3 conv (no bias) and
    BN to the teacher's c_out, and where it fuses a deeper level, a 1x1 conv with bias from the
    two c_mid maps to two attention maps. The two convolutions start kaiming-uniform with a = 1 as
    mdistiller sets them; the attention conv as torch's Conv2d starts (kaiming-uniform with
    a = sqrt(5), bias uniform in +-1/sqrt(fan_in))."""
    init = torch.nn.init.kaiming_uniform_
    params = {'conv1': init(torch.empty(c_mid, c_in, 1, 1), a=1), 'bn1': unit_bnparams(c_mid),
              'conv2': init(torch.empty(c_out, c_mid, 3, 3), a=1), 'bn2': unit_bnparams(c_out)}
    if fuse:
        bound = (2 * c_mid) ** -0.5
        params['att'] = {'weight': init(torch.empty(2, 2 * c_mid, 1, 1), a=5 ** 0.5),
                         'bias': torch.empty(2).uniform_(-bound, bound)}
    return params


def reviewkd_params(channels_s, channels_t, mid_channels=MAX_MID_CHANNELS):
    """ABF modules 'abf<i>' for the student's levels (its groups, then its pooled feature) to the
    teacher's matching channels, min(mid_channels, the pooled feature's) wide as mdistiller's
    min(512, in_channels[-1]); every level but the deepest fuses the one below it."""
    c_mid = min(mid_channels, channels_s[-1])
    return {f'abf{i}': abf_params(c_s, c_mid, c_t, i < len(channels_s) - 1)
            for i, (c_s, c_t) in enumerate(zip(channels_s, channels_t))}


def abf(x, residual, params, base, mode, out_size):
    """One level of the review (mdistiller's ABF.forward): the student's map x is brought to the
    fusion's width; with the deeper level's fused map (`residual`, upsampled to x's size by
    nearest neighbour), the two are mixed by per-position weights, sigmoid of a 1x1 conv over both.
    The result, resized to the teacher's `out_size` if it differs, is this level's residual for the
    next; its 3x3 conv and BN is the output compared with the teacher. (output, residual)."""
    x = batch_norm(F.conv2d(x, params[base + '.conv1']), params, base + '.bn1', mode)
    if residual is not None:
        residual = F.interpolate(residual, size=x.shape[2:], mode='nearest')
        z = torch.sigmoid(F.conv2d(torch.cat([x, residual], 1), params[base + '.att.weight'],
                                   params[base + '.att.bias']))
        x = x * z[:, :1] + residual * z[:, 1:]
    if tuple(x.shape[2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode='nearest')
    return batch_norm(F.conv2d(x, params[base + '.conv2'], padding=1), params, base + '.bn2', mode), x


def review(features, params, base, mode, out_sizes):
    """The student's levels (shallow to deep) fused from the deepest up; the outputs in the
    levels' order, each at the teacher's size out_sizes[i]."""
    outputs, residual = [None] * len(features), None
    for i in reversed(range(len(features))):
        outputs[i], residual = abf(features[i], residual, params, f'{base}.abf{i}', mode, out_sizes[i])
    return outputs


def levels(nets):
    """The student's levels (its groups, then its pooled feature as a 1x1 map) and the teacher's
    targets, shallow to deep, as mdistiller's REVIEWKD configuration describes them."""
    return ([*nets.s.groups, nets.s.pooled[:, :, None, None]], [*nets.t.preact, nets.t.pooled[:, :, None, None]])


def mdistiller_abf(m, levels=4):
    """mdistiller's name of our ABF tensor (match of 'abf<i>.<conv|bn><j>...' or 'abf<i>.att.*'):
    its ModuleList runs deep to shallow; the harness's pair has three groups, so four levels."""
    i, rest = int(m[1]), m[2]
    kind, j, tensor = re.fullmatch(r'(conv|bn|att)(\d?)\.?(.*)', rest).groups()
    where = 'att_conv.0' if kind == 'att' else f'conv{j}.{0 if kind == "conv" else 1}'
    return f'distiller.abfs.{levels - 1 - i}.{where}.{tensor or "weight"}'


class ReviewKD(Method):
    name, title, order = 'reviewkd', 'ReviewKD', 150
    references = {'reviewkd': Reference('mdistiller', (
        'DISTILLER.TYPE', 'REVIEWKD', 'REVIEWKD.CE_WEIGHT', 1.0, 'REVIEWKD.REVIEWKD_WEIGHT', '{reviewkd_beta}',
        'REVIEWKD.WARMUP_EPOCHS', '{reviewkd_warmup}', 'REVIEWKD.MAX_MID_CHANNEL', '{reviewkd_mid_channels}',
        # its configuration describes the pair: sizes deep to shallow, channels shallow to deep
        'REVIEWKD.SHAPES', lambda o, nets: [s.shape[2] for s in levels(nets)[0]][::-1],
        'REVIEWKD.OUT_SHAPES', lambda o, nets: [t.shape[2] for t in levels(nets)[1]][::-1],
        'REVIEWKD.IN_CHANNELS', lambda o, nets: [s.shape[1] for s in levels(nets)[0]],
        'REVIEWKD.OUT_CHANNELS', lambda o, nets: [t.shape[1] for t in levels(nets)[1]]),
        parts=((r'aux\.reviewkd\.abf(\d)\.(.*)', mdistiller_abf),))}
    flags = (
        weight('reviewkd_beta', "knowledge review: B * HCL between the student's groups and pooled feature, fused "
                                "by learned ABF modules, and the teacher's pre-ReLU groups and pooled feature, "
                                "warmed up linearly (mdistiller's CIFAR-100 weight: 5)"),
        setting('reviewkd_warmup', 20, 'epochs over which the ReviewKD weight rises linearly to --reviewkd_beta '
                                       '(0: none)',
                not_negative('use the epochs over which ReviewKD warms up, e.g. 20, or 0 for none', INTEGER),
                forward=None),  # a weight schedule, applied outside the forward
        setting('reviewkd_mid_channels', MAX_MID_CHANNELS,
                "width of ReviewKD's fusion: at most this, at most the student's pooled feature's channels "
                "(mdistiller's min(512, C))",
                at_least_one("use the width of ReviewKD's fusion, e.g. 512 (mdistiller's cap)")),
    )
    reads = ('pooled', 'preact')  # of the pre-ReLU groups, it compares the teacher's, as mdistiller
    examples = {'ReviewKD': {'reviewkd_beta': 5}}

    def parts(self, o, nets, run):  # one ABF module per student level: each group, then the pooled feature
        return {'reviewkd': reviewkd_params([*(s.shape[1] for s in nets.s.groups), nets.s.pooled.shape[1]],
                                            [*(t.shape[1] for t in nets.t.groups), nets.t.pooled.shape[1]],
                                            o.reviewkd_mid_channels)}

    def terms(self, b):
        """mdistiller's preact_feats[1:] + pooled_feat of the teacher as the targets."""
        targets = [*b.t.preact, b.t.pooled[:, :, None, None]]
        fused = review([*b.s.groups, b.s.pooled[:, :, None, None]], b.params, 'aux.reviewkd', b.mode,
                       [t.shape[2:] for t in targets])
        return {'reviewkd': hcl_loss(fused, targets)}

    def weights(self, o, epoch, epoch_step, stage):
        return {'reviewkd': warmed_up(o.reviewkd_beta, o.reviewkd_warmup, epoch)}

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        # mdistiller's configs/cifar100/reviewkd.yaml (resnet32x4 -> resnet8x4), else its default
        return {'reviewkd': {'reviewkd_beta': 5 if (teacher, student) == ('resnet32x4', 'resnet8x4') else 1}}


METHOD = ReviewKD()

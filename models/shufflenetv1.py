"""ShuffleNet (v1) of Zhang et al. (2018) on CIFAR with g = 3 groups, the CRD paper's 'ShuffleV1'.

A 1x1 stem to 24 channels at full resolution (no max-pool), then three stages of 4, 8 and 4
ShuffleNet units ending at 240, 480 and 960 channels (the paper's table 1, g = 3), at 16, 8 and
4 pixels square. A unit (figure 2b, c) is a grouped 1x1 conv to a quarter of its output width,
a channel shuffle, a 3x3 depthwise conv and a grouped 1x1 conv, each followed by BN, with ReLU
after the first two (the paper has none after the depthwise conv; the CRD code does, and its
checkpoints need it); then ReLU of the sum with the input or, in a stage's first unit, whose
depthwise conv has stride 2, of its concatenation with a 3x3 average pool of the input. As in
the paper, the first unit's first 1x1 conv is not grouped (its input has only 24 channels).
A global average pool and a linear classifier end it.

Keys: conv0, bn0 (stem); group{g}.block{i}.conv0, .bn0 (grouped 1x1), .conv1, .bn1 (depthwise),
.conv2, .bn2 (grouped 1x1); fc.weight, fc.bias. Convolutions have no bias.

groups: the three stage outputs, after their last ReLU; preact groups (preact=True): the same
before that ReLU, the last unit's sum (RepDistiller's `preact`). Neither RepDistiller nor
mdistiller names a BN before those ReLUs (both refuse ShuffleNet as an OFD teacher), so
`f.bn_before_relu` is None.
"""
import torch
import torch.nn.functional as F

from utils import batch_norm, bnparams, conv_params, flatten, linear_params, set_requires_grad_except_bn_

WIDTHS, BLOCKS, GROUPS = (240, 480, 960), (4, 8, 4), 3


def shufflenetv1(num_classes):
    """ShuffleNet 1x, g = 3, as (f, params)."""
    def unit_params(ni, no, g_in):
        mid = no // 4
        return {'conv0': conv_params(ni // g_in, mid, 1), 'bn0': bnparams(mid),
                'conv1': conv_params(1, mid, 3), 'bn1': bnparams(mid),
                'conv2': conv_params(mid // GROUPS, no, 1), 'bn2': bnparams(no)}

    groups, ni, units = {}, 24, []  # units: (stage, index, groups of conv0) for the forward
    for g, (n, width) in enumerate(zip(BLOCKS, WIDTHS)):
        groups[f'group{g}'] = {}
        for i in range(n):
            g_in = 1 if ni == 24 else GROUPS
            # a stage's first unit concatenates its input, so its branch adds only the rest
            no = width - ni if i == 0 else width
            groups[f'group{g}'][f'block{i}'] = unit_params(ni, no, g_in)
            units.append((g, i, g_in))
            ni = width
    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, 24, 1), 'bn0': bnparams(24), **groups,
        'fc': linear_params(WIDTHS[-1], num_classes)}))

    def f(x, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        o = s0 = F.relu(batch_norm(F.conv2d(x, params[base + 'conv0']), params, base + 'bn0', mode))
        outputs, preacts = [None] * len(BLOCKS), [None] * len(BLOCKS)
        for g, i, g_in in units:
            preacts[g] = shuffle_unit(o, params, f'{base}group{g}.block{i}.', mode, 2 if i == 0 else 1, g_in)
            o = outputs[g] = F.relu(preacts[g])
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        if stem or feature_map:
            return (logits, tuple(outputs), o, tuple(preacts), s0) + ((m,) if feature_map else ())
        if preact:
            return logits, tuple(outputs), o, tuple(preacts)
        return (logits, tuple(outputs), o) if pooled else (logits, tuple(outputs))

    f.bn_before_relu = None
    return f, params


def channel_shuffle(x, groups):
    """Figure 1c: lets the next grouped conv see channels from every group of the last one."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def shuffle_unit(x, params, base, mode, stride, g_in):
    """The unit's sum (or concatenation) with its shortcut, before its closing ReLU."""
    o = F.conv2d(x, params[base + 'conv0'], groups=g_in)
    o = channel_shuffle(F.relu(batch_norm(o, params, base + 'bn0', mode)), g_in)
    depthwise = params[base + 'conv1']
    o = F.conv2d(o, depthwise, stride=stride, padding=1, groups=depthwise.shape[0])
    o = F.relu(batch_norm(o, params, base + 'bn1', mode))
    o = batch_norm(F.conv2d(o, params[base + 'conv2'], groups=GROUPS), params, base + 'bn2', mode)
    if stride == 2:
        return torch.cat([o, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
    return o + x

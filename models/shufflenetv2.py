"""ShuffleNet V2 1x of Ma et al. (2018) on CIFAR, the CRD paper's 'ShuffleV2'.

A 1x1 stem to 24 channels at full resolution (no max-pool), then three stages at 116, 232 and
464 channels (the paper's table 5, 1x), at 16, 8 and 4 pixels square, each a down-sampling unit
followed by 3, 7 and 3 basic units; then a 1x1 conv to 1024 channels, a global average pool and
a linear classifier.

The down-sampling unit (figure 3d) runs two branches on the whole input and concatenates them:
left, a 3x3 depthwise conv of stride 2 and a 1x1 conv; right, a 1x1 conv, a 3x3 depthwise conv
of stride 2 and a 1x1 conv; each half the output width. The basic unit (figure 3c) splits the
channels in two, passes the first half through, and runs the second through 1x1, 3x3 depthwise
and 1x1 convs. Every conv is followed by BN, and every 1x1 conv's BN by ReLU. Both units end
with a channel shuffle of the concatenation, so that the halves mix.

Keys: conv0, bn0 (stem); group{g}.block0.left.conv{j}, .left.bn{j} (j = 0, 1) and
group{g}.block0.right.conv{j}, .right.bn{j} (j = 0, 1, 2) for the down-sampling unit;
group{g}.block{i}.conv{j}, .bn{j} (i >= 1, j = 0, 1, 2) for the basic units; conv1, bn1 (the
1x1 conv to 1024); fc.weight, fc.bias. Convolutions have no bias.

groups: the three stage outputs (after the shuffle of their last unit); preact groups
(preact=True): the last unit's concatenation before its branch's closing ReLU and before the
shuffle, the passed-through half first (RepDistiller's `preact`). Neither RepDistiller nor
mdistiller names a BN before those ReLUs (both refuse ShuffleNet as an OFD teacher), so
`f.bn_before_relu` is None.
"""
import torch
import torch.nn.functional as F

from models.shufflenetv1 import channel_shuffle
from utils import (
    batch_norm,
    bnparams,
    conv_params,
    flatten,
    head_batch_norm,
    linear_params,
    set_requires_grad_except_bn_,
)

WIDTHS, BLOCKS, LAST = (116, 232, 464), (3, 7, 3), 1024


def shufflenetv2(num_classes):
    """ShuffleNet V2 1x, as (f, params)."""
    groups, ni = {}, 24
    for g, (n, no) in enumerate(zip(BLOCKS, WIDTHS)):
        groups[f'group{g}'] = {'block0': down_params(ni, no),
                               **{f'block{i}': basic_params(no // 2, no // 2) for i in range(1, n + 1)}}
        ni = no
    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, 24, 1), 'bn0': bnparams(24), **groups,
        'conv1': conv_params(ni, LAST, 1), 'bn1': bnparams(LAST), 'fc': linear_params(LAST, num_classes)}))

    def f(x, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        o = s0 = F.relu(batch_norm(F.conv2d(x, params[base + 'conv0']), params, base + 'bn0', mode))
        outputs, halves = [], []
        for g, n in enumerate(BLOCKS):
            o = down_unit(o, params, f'{base}group{g}.block0.', mode)
            for i in range(1, n + 1):
                o, last = basic_unit(o, params, f'{base}group{g}.block{i}.', mode)
            outputs.append(o)
            halves.append(last)
        o = F.relu(head_batch_norm(F.conv2d(o, params[base + 'conv1']), params, base + 'bn1', mode))
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        preacts = tuple(torch.cat(h, 1) for h in halves) if preact or stem or feature_map else None
        if stem or feature_map:
            return (logits, tuple(outputs), o, preacts, s0) + ((m,) if feature_map else ())
        if preact:
            return logits, tuple(outputs), o, preacts
        return (logits, tuple(outputs), o) if pooled else (logits, tuple(outputs))

    f.bn_before_relu = None
    return f, params


def down_params(ni, no):
    half = no // 2
    return {'left': {'conv0': conv_params(1, ni, 3), 'bn0': bnparams(ni),
                     'conv1': conv_params(ni, half, 1), 'bn1': bnparams(half)},
            'right': basic_params(ni, half)}


def basic_params(ni, no):
    return {'conv0': conv_params(ni, no, 1), 'bn0': bnparams(no),
            'conv1': conv_params(1, no, 3), 'bn1': bnparams(no),
            'conv2': conv_params(no, no, 1), 'bn2': bnparams(no)}


def pointwise(x, params, base, j, mode, relu=True):
    """1x1 conv j of a branch, its BN and (unless relu is False) a ReLU."""
    o = batch_norm(F.conv2d(x, params[f'{base}conv{j}']), params, f'{base}bn{j}', mode)
    return F.relu(o) if relu else o


def depthwise(x, params, base, j, mode, stride):
    """3x3 depthwise conv j of a branch and its BN, without ReLU (figure 3)."""
    w = params[f'{base}conv{j}']
    o = F.conv2d(x, w, stride=stride, padding=1, groups=w.shape[0])
    return batch_norm(o, params, f'{base}bn{j}', mode)


def branch(x, params, base, mode, stride):
    """1x1, 3x3 depthwise (carrying the stride), 1x1: the right branch of both units, before
    its closing ReLU."""
    o = pointwise(x, params, base, 0, mode)
    return pointwise(depthwise(o, params, base, 1, mode, stride), params, base, 2, mode, relu=False)


def down_unit(x, params, base, mode):
    left = depthwise(x, params, base + 'left.', 0, mode, stride=2)
    left = pointwise(left, params, base + 'left.', 1, mode)
    right = F.relu(branch(x, params, base + 'right.', mode, stride=2))
    return channel_shuffle(torch.cat([left, right], 1), 2)


def basic_unit(x, params, base, mode):
    """The unit's output, and the two halves it concatenates before the branch's ReLU."""
    kept, transformed = x.chunk(2, dim=1)
    a = branch(transformed, params, base, mode, 1)
    return channel_shuffle(torch.cat([kept, F.relu(a)], 1), 2), (kept, a)

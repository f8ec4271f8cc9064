"""The CIFAR ResNets of He et al. (2016), section 4.2, as the CRD paper trains them.

A 3x3 stem, then three groups of n basic blocks at 32, 16 and 8 pixels square; depth = 6n + 2.
The blocks are post-activation (the paper's figure 5, left): conv-BN-ReLU-conv-BN, plus the
shortcut, then ReLU. Where a block changes shape its shortcut is a strided 1x1 conv with a BN
(the paper's option B; its own CIFAR runs used zero-padding, option A), as in the CRD code.

    resnet8 ... resnet110   widths 16 (stem), 16, 32, 64
    resnet8x4, resnet32x4   widths 32 (stem), 64, 128, 256: the first block of group0 has a
                            projection shortcut too, since the stem is narrower than the group

Keys: conv0, bn0 (stem); group{g}.block{i}.conv0, .bn0, .conv1, .bn1, and where the shape
changes .shortcut.conv, .shortcut.bn; fc.weight, fc.bias. Convolutions have no bias.

groups: the three group outputs, after their last ReLU; preact groups (preact=True): the same
before that ReLU, the last block's sum (RepDistiller's `preact`), whose distribution that block's
bn1 sets (`f.bn_before_relu`).
"""
import torch.nn.functional as F

from utils import batch_norm, bnparams, conv_params, flatten, linear_params, set_requires_grad_except_bn_

WIDTHS = {1: (16, 16, 32, 64), 4: (32, 64, 128, 256)}


def resnet(depth, widen, num_classes):
    """ResNet-`depth` (6n+2) with widths WIDTHS[widen], as (f, params)."""
    assert (depth - 2) % 6 == 0, 'depth should be 6n+2'
    n = (depth - 2) // 6
    stem, *widths = WIDTHS[widen]

    def block_params(ni, no, stride):
        projection = stride != 1 or ni != no
        return {'conv0': conv_params(ni, no, 3), 'bn0': bnparams(no),
                'conv1': conv_params(no, no, 3), 'bn1': bnparams(no),
                'shortcut': {'conv': conv_params(ni, no, 1), 'bn': bnparams(no)} if projection else None}

    groups, ni = {}, stem
    for g, no in enumerate(widths):
        groups[f'group{g}'] = {f'block{i}': block_params(ni if i == 0 else no, no, stride(g, i))
                               for i in range(n)}
        ni = no
    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, stem, 3), 'bn0': bnparams(stem),
        **groups, 'fc': linear_params(widths[-1], num_classes)}))

    def f(x, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        o = F.conv2d(x, params[base + 'conv0'], padding=1)
        o = s0 = F.relu(batch_norm(o, params, base + 'bn0', mode))
        outputs, preacts = [], []
        for g in range(3):
            for i in range(n):
                sum_ = basic_block(o, params, f'{base}group{g}.block{i}.', mode, stride(g, i))
                o = F.relu(sum_)
            outputs.append(o)
            preacts.append(sum_)
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        if stem or feature_map:
            return (logits, tuple(outputs), o, tuple(preacts), s0) + ((m,) if feature_map else ())
        if preact:
            return logits, tuple(outputs), o, tuple(preacts)
        return (logits, tuple(outputs), o) if pooled else (logits, tuple(outputs))

    f.bn_before_relu = tuple(f'group{g}.block{n - 1}.bn1' for g in range(3))
    return f, params


def stride(g, i):
    """Groups 1 and 2 halve the resolution in their first block."""
    return 2 if g > 0 and i == 0 else 1


def basic_block(x, params, base, mode, stride):
    """The block's sum of residual and shortcut, before its closing ReLU."""
    o = F.conv2d(x, params[base + 'conv0'], stride=stride, padding=1)
    o = F.relu(batch_norm(o, params, base + 'bn0', mode))
    o = batch_norm(F.conv2d(o, params[base + 'conv1'], padding=1), params, base + 'bn1', mode)
    if base + 'shortcut.conv' in params:
        x = F.conv2d(x, params[base + 'shortcut.conv'], stride=stride)
        x = batch_norm(x, params, base + 'shortcut.bn', mode)
    return o + x

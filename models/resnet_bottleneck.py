"""ResNet-50 of He et al. (2016) on CIFAR, as the CRD paper trains it ('ResNet50').

The ImageNet network's four groups of bottleneck blocks (3, 4, 6, 3 blocks; the paper's table 1
and figure 5, right): 1x1 reduce, 3x3 (strided in a group's first block), 1x1 expand to four
times the width, each followed by BN; ReLU after the first two and after the sum with the
shortcut. The stem is CIFAR-sized: one 3x3 conv at full resolution and no max-pool, so the
groups run at 32, 16, 8 and 4 pixels square. Where a block changes shape its shortcut is a
strided 1x1 conv with a BN.

Keys: conv0, bn0 (stem); group{g}.block{i}.conv0, .bn0, .conv1, .bn1, .conv2, .bn2, and where
the shape changes .shortcut.conv, .shortcut.bn; fc.weight, fc.bias. Convolutions have no bias.

groups: the four group outputs, after their last ReLU; preact groups (preact=True): the same
before that ReLU, the last block's sum (RepDistiller's `preact`), whose distribution that block's
bn2 sets (`f.bn_before_relu`).
"""
import torch.nn.functional as F

from utils import batch_norm, bnparams, conv_params, flatten, linear_params, set_requires_grad_except_bn_

EXPANSION = 4


def resnet50(num_classes):
    return bottleneck_resnet((3, 4, 6, 3), num_classes)


def bottleneck_resnet(blocks, num_classes):
    """A four-group bottleneck ResNet with `blocks[g]` blocks in group g, as (f, params)."""
    widths = (64, 128, 256, 512)

    def block_params(ni, width, stride):
        no = width * EXPANSION
        projection = stride != 1 or ni != no
        return {'conv0': conv_params(ni, width, 1), 'bn0': bnparams(width),
                'conv1': conv_params(width, width, 3), 'bn1': bnparams(width),
                'conv2': conv_params(width, no, 1), 'bn2': bnparams(no),
                'shortcut': {'conv': conv_params(ni, no, 1), 'bn': bnparams(no)} if projection else None}

    groups, ni = {}, 64
    for g, (n, width) in enumerate(zip(blocks, widths)):
        groups[f'group{g}'] = {f'block{i}': block_params(ni if i == 0 else width * EXPANSION, width,
                                                         stride(g, i)) for i in range(n)}
        ni = width * EXPANSION
    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, 64, 3), 'bn0': bnparams(64),
        **groups, 'fc': linear_params(widths[-1] * EXPANSION, num_classes)}))

    def f(x, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        o = F.conv2d(x, params[base + 'conv0'], padding=1)
        o = s0 = F.relu(batch_norm(o, params, base + 'bn0', mode))
        outputs, preacts = [], []
        for g, n in enumerate(blocks):
            for i in range(n):
                sum_ = bottleneck(o, params, f'{base}group{g}.block{i}.', mode, stride(g, i))
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

    f.bn_before_relu = tuple(f'group{g}.block{n - 1}.bn2' for g, n in enumerate(blocks))
    return f, params


def stride(g, i):
    """Groups 1 to 3 halve the resolution in their first block."""
    return 2 if g > 0 and i == 0 else 1


def bottleneck(x, params, base, mode, stride):
    """The block's sum of residual and shortcut, before its closing ReLU."""
    o = F.relu(batch_norm(F.conv2d(x, params[base + 'conv0']), params, base + 'bn0', mode))
    o = F.conv2d(o, params[base + 'conv1'], stride=stride, padding=1)
    o = F.relu(batch_norm(o, params, base + 'bn1', mode))
    o = batch_norm(F.conv2d(o, params[base + 'conv2']), params, base + 'bn2', mode)
    if base + 'shortcut.conv' in params:
        x = F.conv2d(x, params[base + 'shortcut.conv'], stride=stride)
        x = batch_norm(x, params, base + 'shortcut.bn', mode)
    return o + x

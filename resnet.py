"""Networks as pure functions over flat parameter dicts.

`resnet(depth, width, num_classes)` is the CIFAR Wide ResNet of Zagoruyko & Komodakis (2016)
as used in the attention-transfer paper: pre-activation basic blocks, three groups of
n = (depth - 4) / 6 blocks with 16k, 32k, 64k channels, a 1x1 `convdim` shortcut where the
channel count changes. Key names match the reference code, so its checkpoints load.
"""
import torch.nn.functional as F

from utils import conv_params, linear_params, bnparams, flatten, batch_norm, \
    set_requires_grad_except_bn_


def wrn_block_count(depth):
    """Blocks per group for a WRN of this depth, or None if depth is not 6n+4."""
    if depth < 10 or (depth - 4) % 6 != 0:
        return None
    return (depth - 4) // 6


def resnet(depth, width, num_classes):
    n = wrn_block_count(depth)
    assert n is not None, 'depth should be 6n+4'
    widths = [int(c * width) for c in (16, 32, 64)]

    # Dict order (conv0, conv1, bn0, bn1, convdim) follows the reference code: the optimizer's
    # saved momentum buffers are indexed by position.
    def block_params(ni, no):
        return {'conv0': conv_params(ni, no, 3), 'conv1': conv_params(no, no, 3),
                'bn0': bnparams(ni), 'bn1': bnparams(no),
                'convdim': conv_params(ni, no, 1) if ni != no else None}

    def group_params(ni, no):
        return {f'block{i}': block_params(ni if i == 0 else no, no) for i in range(n)}

    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, 16, 3),
        'group0': group_params(16, widths[0]),
        'group1': group_params(widths[0], widths[1]),
        'group2': group_params(widths[1], widths[2]),
        'bn': bnparams(widths[2]),
        'fc': linear_params(widths[2], num_classes),
    }))

    def block(x, params, base, mode, stride):
        o1 = F.relu(batch_norm(x, params, base + '.bn0', mode))
        y = F.conv2d(o1, params[base + '.conv0'], stride=stride, padding=1)
        o2 = F.relu(batch_norm(y, params, base + '.bn1', mode))
        z = F.conv2d(o2, params[base + '.conv1'], stride=1, padding=1)
        if base + '.convdim' in params:
            return z + F.conv2d(o1, params[base + '.convdim'], stride=stride)
        return z + x

    def group(o, params, base, mode, stride):
        for i in range(n):
            o = block(o, params, f'{base}.block{i}', mode, stride if i == 0 else 1)
        return o

    def f(input, params, mode, base=''):
        x = F.conv2d(input, params[base + 'conv0'], padding=1)
        g0 = group(x, params, base + 'group0', mode, 1)
        g1 = group(g0, params, base + 'group1', mode, 2)
        g2 = group(g1, params, base + 'group2', mode, 2)
        o = F.relu(batch_norm(g2, params, base + 'bn', mode))
        o = F.avg_pool2d(o, 8, 1, 0).flatten(1)
        o = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        return o, (g0, g1, g2)

    return f, params

"""MobileNetV2 of Sandler et al. (2018) on CIFAR at half width, the CRD paper's 'MobileNetV2'.

A strided 3x3 stem, then the seven stages of the paper's table 2 (expansion t, channels c,
blocks n, stride s), each of inverted-residual blocks (figure 4d and table 1): 1x1 expansion to
t times the channels, 3x3 depthwise conv, 1x1 linear projection, a BN after each and a ReLU
after the first two; the input is added where the shape is unchanged. A 1x1 conv to 1280
channels, a global average pool and a linear classifier end it. As in the CRD code, channel
counts c are halved (width 0.5, the 1280 is not), the ReLUs are not clipped at 6, the stride of
the second stage is 1 rather than 2 (a CIFAR image is small), and blocks with t = 1 keep their
expansion conv. At 32x32 input the stem runs at 16 pixels square and the stages at 16, 16, 8,
4, 4, 2 and 2.

Keys: conv0, bn0 (stem); group{s}.block{i}.conv0, .bn0 (expansion), .conv1, .bn1 (depthwise),
.conv2, .bn2 (projection); conv1, bn1 (the 1x1 conv to 1280); fc.weight, fc.bias.
Convolutions have no bias.

groups: the outputs of stages 1, 2, 4 and 6, the last stage at each resolution (16, 8, 4, 2).
No ReLU follows them (the projection is linear), so the preact groups (preact=True) are the
groups themselves, as RepDistiller's forward returns them with preact=True; their distribution
is set by the last projection BN of each stage (`f.bn_before_relu`, RepDistiller's and
mdistiller's `blocks[s][-1].conv[-1]`).
"""
import torch.nn.functional as F

from utils import (
    batch_norm,
    bnparams,
    conv_params,
    flatten,
    head_batch_norm,
    linear_params,
    set_requires_grad_except_bn_,
)

STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),  # t, c, n, s
          (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
GROUPS = (1, 2, 4, 6)


def mobilenetv2(num_classes, width=0.5):
    """MobileNetV2 with channel counts scaled by `width`, as (f, params)."""
    stem, last = int(32 * width), int(1280 * max(width, 1.0))

    def block_params(ni, no, t):
        return {'conv0': conv_params(ni, ni * t, 1), 'bn0': bnparams(ni * t),
                'conv1': conv_params(1, ni * t, 3), 'bn1': bnparams(ni * t),
                'conv2': conv_params(ni * t, no, 1), 'bn2': bnparams(no)}

    groups, ni, blocks = {}, stem, []  # blocks: (stage, index, stride, residual) for the forward
    for s, (t, c, n, stride) in enumerate(STAGES):
        no = int(c * width)
        groups[f'group{s}'] = {}
        for i in range(n):
            groups[f'group{s}'][f'block{i}'] = block_params(ni, no, t)
            first_stride = stride if i == 0 else 1
            blocks.append((s, i, first_stride, first_stride == 1 and ni == no))
            ni = no
    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, stem, 3), 'bn0': bnparams(stem), **groups,
        'conv1': conv_params(ni, last, 1), 'bn1': bnparams(last), 'fc': linear_params(last, num_classes)}))

    def f(x, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        o = F.conv2d(x, params[base + 'conv0'], stride=2, padding=1)
        o = s0 = F.relu(batch_norm(o, params, base + 'bn0', mode))
        outputs = {}
        for s, i, stride, residual in blocks:
            y = inverted_residual(o, params, f'{base}group{s}.block{i}.', mode, stride)
            o = o + y if residual else y
            outputs[s] = o
        o = F.relu(head_batch_norm(F.conv2d(o, params[base + 'conv1']), params, base + 'bn1', mode))
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        groups = tuple(outputs[s] for s in GROUPS)
        if stem or feature_map:
            return (logits, groups, o, groups, s0) + ((m,) if feature_map else ())
        if preact:
            return logits, groups, o, groups
        return (logits, groups, o) if pooled else (logits, groups)

    f.bn_before_relu = tuple(f'group{s}.block{STAGES[s][2] - 1}.bn2' for s in GROUPS)
    return f, params


def inverted_residual(x, params, base, mode, stride):
    o = F.relu(batch_norm(F.conv2d(x, params[base + 'conv0']), params, base + 'bn0', mode))
    depthwise = params[base + 'conv1']
    o = F.conv2d(o, depthwise, stride=stride, padding=1, groups=depthwise.shape[0])
    o = F.relu(batch_norm(o, params, base + 'bn1', mode))
    # No ReLU after the projection: the paper's linear bottleneck (section 3.2).
    return batch_norm(F.conv2d(o, params[base + 'conv2']), params, base + 'bn2', mode)

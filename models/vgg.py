"""VGG of Simonyan & Zisserman (2015) with batch norm, on CIFAR, as the CRD paper trains it.

Five groups of 3x3 conv-BN-ReLU layers at 64, 128, 256, 512 and 512 channels; the numbers of
convs per group follow the paper's table 1 (A = vgg11, B = vgg13, D = vgg16, E = vgg19; vgg8 is
the CRD paper's one-conv-per-group variant). On 32x32 input only the first three groups are
followed by a 2x2 max-pool, so the last two both run at 4x4. In place of the three fully
connected layers there is a global average pool and one linear classifier.

Keys: group{g}.conv{j}.weight, .bias (these convs keep their bias, as in the CRD code, although
a BN follows); group{g}.bn{j}; fc.weight, fc.bias.

groups: the outputs of groups 1 to 4, after their last ReLU (group 0 plays the stem's part and,
as in the CRD code, attention transfer leaves it out); preact groups (preact=True): the same
before that ReLU, the output of the group's last BN (RepDistiller's `f{g}_pre`, that BN named in
`f.bn_before_relu`).
"""
import torch
import torch.nn.functional as F

from utils import batch_norm, bnparams, conv_params, flatten, linear_params, set_requires_grad_except_bn_

WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_GROUP = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2),
                   16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def vgg(depth, num_classes):
    """VGG-`depth` (8, 11, 13, 16 or 19) with BN, as (f, params)."""
    convs = CONVS_PER_GROUP[depth]

    def conv_bn_params(ni, no):
        return {'weight': conv_params(ni, no, 3), 'bias': torch.zeros(no)}, bnparams(no)

    groups, ni = {}, 3
    for g, (n, no) in enumerate(zip(convs, WIDTHS)):
        group = {}
        for j in range(n):
            group[f'conv{j}'], group[f'bn{j}'] = conv_bn_params(ni, no)
            ni = no
        groups[f'group{g}'] = group
    params = set_requires_grad_except_bn_(flatten({**groups, 'fc': linear_params(WIDTHS[-1], num_classes)}))

    def f(x, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        # The CRD code pools after group 3 only for 64x64 input (Tiny ImageNet), so that there
        # too the last group runs at 4x4.
        pools = (True, True, True, x.shape[2] == 64, False)
        o, outputs, preacts = x, [], []
        for g, n in enumerate(convs):
            for j in range(n):
                o = F.conv2d(o, params[f'{base}group{g}.conv{j}.weight'],
                             params[f'{base}group{g}.conv{j}.bias'], padding=1)
                a = batch_norm(o, params, f'{base}group{g}.bn{j}', mode)
                o = F.relu(a)
            outputs.append(o)
            preacts.append(a)
            if pools[g]:
                o = F.max_pool2d(o, 2)
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        if stem or feature_map:  # the first group, which the groups leave out
            return (logits, tuple(outputs[1:]), o, tuple(preacts[1:]), outputs[0]) + ((m,) if feature_map else ())
        if preact:
            return logits, tuple(outputs[1:]), o, tuple(preacts[1:])
        return (logits, tuple(outputs[1:]), o) if pooled else (logits, tuple(outputs[1:]))

    f.bn_before_relu = tuple(f'group{g}.bn{convs[g] - 1}' for g in range(1, len(convs)))
    return f, params

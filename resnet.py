"""Networks as pure functions over flat parameter dicts.

`resnet(depth, width, num_classes)` is the CIFAR Wide ResNet of Zagoruyko & Komodakis (2016)
as used in the attention-transfer paper: pre-activation basic blocks, three groups of
n = (depth - 4) / 6 blocks with 16k, 32k, 64k channels, a 1x1 `convdim` shortcut where the
channel count changes. Key names match the reference code, so its checkpoints load.

`define_student(depth, width, num_classes)` and `define_teacher(path)` are the ImageNet
ResNet-18/34 of the paper's section 4.2; the teacher runs with its BNs folded into the convs.

Every network also takes pooled=True and then returns (logits, groups, feature): the feature is
the (B, C) vector its classifier reads, which relation-based methods (CC, RKD, PKT) compare.
The CIFAR networks (the WRN here, the families in models/) also take preact=True and then return
(logits, groups, feature, preact_groups): each group's output before the ReLU that follows it, as
RepDistiller's `preact=True` features define it, which AB and OFD compare; `f.bn_before_relu`
names, per group, the batch norm that sets that output's distribution (OFD's margins). The
ImageNet networks take no preact.
Every network takes stem=True (the output of the layers before the first group, fifth) and
feature_map=True (with everything before it, sixth: the map whose global average is the
feature, to which SDD and CAT-KD apply the classifier region by region).
"""
import os
import re

import torch
import torch.nn.functional as F

from engine.checkpoint import check_finite, network_params
from engine.errors import UserError
from utils import (
    batch_norm,
    bnparams,
    conv_params,
    flatten,
    head_batch_norm,
    linear_params,
    set_requires_grad_except_bn_,
)


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
        """The block's output and its input's batch norm (before that ReLU)."""
        a = batch_norm(x, params, base + '.bn0', mode)
        o1 = F.relu(a)
        y = F.conv2d(o1, params[base + '.conv0'], stride=stride, padding=1)
        o2 = F.relu(batch_norm(y, params, base + '.bn1', mode))
        z = F.conv2d(o2, params[base + '.conv1'], stride=1, padding=1)
        if base + '.convdim' in params:
            return z + F.conv2d(o1, params[base + '.convdim'], stride=stride), a
        return z + x, a

    def group(o, params, base, mode, stride):
        """The group's output and its first block's bn0 of the group's input."""
        o, entry = block(o, params, f'{base}.block0', mode, stride)
        for i in range(1, n):
            o, _ = block(o, params, f'{base}.block{i}', mode, 1)
        return o, entry

    def f(input, params, mode, base='', pooled=False, preact=False, stem=False, feature_map=False):
        x = F.conv2d(input, params[base + 'conv0'], padding=1)
        g0, _ = group(x, params, base + 'group0', mode, 1)
        g1, p0 = group(g0, params, base + 'group1', mode, 2)
        g2, p1 = group(g1, params, base + 'group2', mode, 2)
        p2 = head_batch_norm(g2, params, base + 'bn', mode)
        m = F.relu(p2)
        o = F.avg_pool2d(m, 8, 1, 0).flatten(1)
        logits = F.linear(o, params[base + 'fc.weight'], params[base + 'fc.bias'])
        if stem or feature_map:  # a pre-activation network's stem is its first convolution
            return (logits, (g0, g1, g2), o, (p0, p1, p2), x) + ((m,) if feature_map else ())
        if preact:
            # A pre-activation block has no ReLU at its end: RepDistiller's pre-ReLU value of a
            # group is the BN that the next block (or the final bn) applies to it, which the
            # forward computes anyway, so asking for it costs nothing (nor updates BN stats twice).
            return logits, (g0, g1, g2), o, (p0, p1, p2)
        return (logits, (g0, g1, g2), o) if pooled else (logits, (g0, g1, g2))

    f.bn_before_relu = ('group1.block0.bn0', 'group2.block0.bn0', 'bn')
    return f, params


# ----------------------------------------------------------------------------------------------
# ImageNet ResNet-18/34 (He et al. 2016): post-activation basic blocks, 7x7 stem and max-pool,
# four groups of 64k, 128k, 256k, 512k channels, global average pool. The AT losses compare
# the outputs of the four groups (56, 28, 14 and 7 pixels square at 224x224 input).

IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def define_student(depth, width, num_classes=1000):
    """ResNet-18/34 as (f, params), f(input, params, mode, prefix='') -> (logits, [g0..g3]).

    Unlike the original student, the 1x1 shortcut carries a BN (`bn_dim`), as in torchvision's
    model: the parameter count (11,689,512 for ResNet-18) and the arithmetic are then those of
    the ResNet-18 whose 30.4/10.8 top-1/top-5 error the paper quotes, and a trained student
    converts to torchvision's layout (and can teach) by renaming and folding its BNs."""
    assert depth in IMAGENET_BLOCKS, 'depth should be 18 or 34'
    blocks = IMAGENET_BLOCKS[depth]
    widths = [int(c * width) for c in (64, 128, 256, 512)]

    def block_params(ni, no):
        return {'conv0': conv_params(ni, no, 3), 'bn0': bnparams(no),
                'conv1': conv_params(no, no, 3), 'bn1': bnparams(no),
                'conv_dim': conv_params(ni, no, 1) if ni != no else None,
                'bn_dim': bnparams(no) if ni != no else None}

    groups = {}
    for g, (n, no) in enumerate(zip(blocks, widths)):
        ni = widths[g - 1] if g else widths[0]
        groups[f'group{g}'] = {f'block{i}': block_params(ni if i == 0 else no, no) for i in range(n)}
    params = set_requires_grad_except_bn_(flatten({
        'conv0': conv_params(3, widths[0], 7), 'bn0': bnparams(widths[0]),
        **groups, 'fc': linear_params(widths[3], num_classes)}))

    def block(x, params, base, mode, stride):
        o = F.conv2d(x, params[base + '.conv0'], stride=stride, padding=1)
        o = F.relu(batch_norm(o, params, base + '.bn0', mode))
        o = batch_norm(F.conv2d(o, params[base + '.conv1'], padding=1), params, base + '.bn1', mode)
        if base + '.conv_dim' in params:
            x = batch_norm(F.conv2d(x, params[base + '.conv_dim'], stride=stride), params, base + '.bn_dim', mode)
        return F.relu(o + x)

    def f(input, params, mode, prefix='', pooled=False, stem=False, feature_map=False):
        o = F.conv2d(input, params[prefix + 'conv0'], stride=2, padding=3)
        s0 = F.relu(batch_norm(o, params, prefix + 'bn0', mode))
        o = F.max_pool2d(s0, 3, 2, 1)
        outputs = []
        for g, n in enumerate(blocks):
            for i in range(n):
                o = block(o, params, f'{prefix}group{g}.block{i}', mode, 2 if g and not i else 1)
            outputs.append(o)
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias'])
        if stem or feature_map:  # no pre-ReLU groups here
            return (logits, outputs, o, None, s0) + ((m,) if feature_map else ())
        return (logits, outputs, o) if pooled else (logits, outputs)

    return f, params


def teacher_forward(blocks):
    """The BN-folded ResNet of the original export: every conv has a bias, no BN anywhere.
    The shortcut's BN shift is folded into the block's second conv bias (both are added)."""
    def block(x, params, base, stride):
        o = F.relu(F.conv2d(x, params[base + '.conv0.weight'], params[base + '.conv0.bias'],
                            stride=stride, padding=1))
        o = F.conv2d(o, params[base + '.conv1.weight'], params[base + '.conv1.bias'], padding=1)
        if base + '.conv_dim.weight' in params:
            x = F.conv2d(x, params[base + '.conv_dim.weight'], stride=stride)
        return F.relu(o + x)

    def f(input, params, prefix='', pooled=False, stem=False, feature_map=False):
        o = F.conv2d(input, params[prefix + 'conv0.weight'], params[prefix + 'conv0.bias'], stride=2, padding=3)
        s0 = F.relu(o)
        o = F.max_pool2d(s0, 3, 2, 1)
        outputs = []
        for g, n in enumerate(blocks):
            for i in range(n):
                o = block(o, params, f'{prefix}group{g}.block{i}', 2 if g and not i else 1)
            outputs.append(o)
        m, o = o, F.adaptive_avg_pool2d(o, 1).flatten(1)
        logits = F.linear(o, params[prefix + 'fc.weight'], params[prefix + 'fc.bias'])
        if stem or feature_map:  # no pre-ReLU groups here
            return (logits, outputs, o, None, s0) + ((m,) if feature_map else ())
        return (logits, outputs, o) if pooled else (logits, outputs)

    return f


def fold_batch_norm(params, eps=1e-5):
    """Student-layout params (conv + BN) -> the export layout (conv weight and bias, no BN):
    w' = w * gamma / sqrt(var + eps), b' = beta - mean * gamma / sqrt(var + eps). Computed in
    float64 so folding adds no rounding of its own."""
    p = {k: v.detach().double() for k, v in params.items()}

    def fold(conv, bn):
        scale = p[bn + '.weight'] / (p[bn + '.running_var'] + eps).sqrt()
        return p[conv] * scale.view(-1, 1, 1, 1), p[bn + '.bias'] - p[bn + '.running_mean'] * scale

    out = {}
    out['conv0.weight'], out['conv0.bias'] = fold('conv0', 'bn0')
    for base in sorted({k.rsplit('.', 1)[0] for k in p if k.startswith('group') and k.endswith('.conv0')}):
        out[base + '.conv0.weight'], out[base + '.conv0.bias'] = fold(base + '.conv0', base + '.bn0')
        out[base + '.conv1.weight'], out[base + '.conv1.bias'] = fold(base + '.conv1', base + '.bn1')
        if base + '.conv_dim' in p:
            out[base + '.conv_dim.weight'], shift = fold(base + '.conv_dim', base + '.bn_dim')
            out[base + '.conv1.bias'] = out[base + '.conv1.bias'] + shift
    out['fc.weight'], out['fc.bias'] = p['fc.weight'], p['fc.bias']
    return {k: v.float() for k, v in out.items()}


TORCHVISION_NAMES = [  # torchvision resnet18/34 state-dict names -> the student's names
    (r'conv1\.weight', 'conv0'), (r'bn1\.(\w+)', r'bn0.\1'),
    (r'layer(\d)\.(\d+)\.conv1\.weight', r'group\1.block\2.conv0'),
    (r'layer(\d)\.(\d+)\.conv2\.weight', r'group\1.block\2.conv1'),
    (r'layer(\d)\.(\d+)\.bn1\.(\w+)', r'group\1.block\2.bn0.\3'),
    (r'layer(\d)\.(\d+)\.bn2\.(\w+)', r'group\1.block\2.bn1.\3'),
    (r'layer(\d)\.(\d+)\.downsample\.0\.weight', r'group\1.block\2.conv_dim'),
    (r'layer(\d)\.(\d+)\.downsample\.1\.(\w+)', r'group\1.block\2.bn_dim.\3'),
    (r'fc\.(weight|bias)', r'fc.\1'),
]


def from_torchvision(state, path, role='teacher'):
    """The tensors under the student's names, and {student name: torchvision name}."""
    params, names = {}, {}
    for k, v in state.items():
        if k.endswith('num_batches_tracked'):
            continue
        for pattern, name in TORCHVISION_NAMES:
            if re.fullmatch(pattern, k):
                name = re.sub(pattern, name, k)
                # torchvision counts layers from 1, the original code groups from 0
                name = re.sub(r'group(\d)', lambda m: f'group{int(m[1]) - 1}', name)
                params[name], names[name] = v, k
                break
        else:
            can = 'teach' if role == 'teacher' else 'start a student'
            raise UserError(f'{path}: unexpected tensor {k}; only basic-block ResNets '
                            f'(torchvision resnet18, resnet34) can {can} here')
    return params, names


TEACHER_FILES = 'a torchvision resnet18/34 state dict, the BN-folded export or a model.pt7 as --teacher_params'
STUDENT_FILES = 'a torchvision resnet18/34 state dict or a model.pt7 of imagenet.py as --student_params'


def read_weights_file(path, role='teacher', files=TEACHER_FILES):
    """(tensors, {our name: the file's name}, whether they still have BNs to fold) from any
    file define_teacher (or, for a student, load_student_file) reads."""
    if not os.path.isfile(path):
        raise UserError(f'{role} weights {path} do not exist; pass {files}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load reports damage through many exception types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f'cannot read {role} weights {path} ({first_line}); expected a file '
                        f'written by torch.save') from None
    if isinstance(state, dict) and isinstance(state.get('params'), dict):  # a model.pt7
        state = network_params({**state['params'], **(state.get('stats') or {})})
    elif isinstance(state, dict) and isinstance(state.get('state_dict'), dict):  # pytorch/examples
        state = state['state_dict']
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'{path} is not a dict of tensors; expected {role} weights saved with torch.save')
    if all(k.startswith('module.') for k in state):  # saved from nn.DataParallel
        state = {k[len('module.'):]: v for k, v in state.items()}
    if 'conv1.weight' in state:
        return (*from_torchvision(state, path, role), True)
    return state, {}, 'conv0' in state


def check_tensors(params, expected, names, path, what, fix=''):
    for k in sorted(expected.keys() | params.keys()):
        if k not in params or k not in expected:
            problem = f'it lacks {k}' if k not in params else f'it has unexpected {names.get(k, k)}'
            raise UserError(f'{path} is not {what}: {problem}{fix}')
        if params[k].shape != expected[k].shape:
            raise UserError(f'{path} is not {what}: {names.get(k, k)} has shape '
                            f'{tuple(params[k].shape)}, expected {tuple(expected[k].shape)}{fix}')


def load_student_file(path, depth, width, num_classes):
    """The student's tensors from a torchvision resnet18/34 state dict or a model.pt7 of
    imagenet.py, checked against --depth, --width and the data's classes, in the file's dtype."""
    params, names, has_bn = read_weights_file(path, 'student', STUDENT_FILES)
    if not has_bn:
        raise UserError(f'{path} is a BN-folded export, which has no batch norms for a student to train; pass '
                        f'{STUDENT_FILES}')
    with torch.device('meta'):  # shapes only
        expected = define_student(depth, width, num_classes)[1]
    check_tensors(params, expected, names, path, f'a ResNet-{depth} of --width {width:g} for {num_classes} classes',
                  '; check --depth and --width, or pass other weights as --student_params')
    check_finite({names.get(k, k): v for k, v in params.items()}, f'student {path}',
                 'pass other weights as --student_params')
    return {k: v.detach() for k, v in params.items()}


def define_teacher(path):
    """A trained ResNet-18/34 as (f, params), f(input, params, prefix='') -> (logits, [g0..g3]).

    Reads (a) the original BN-folded export (conv0.weight/bias, group{g}.block{i}.conv{0,1}.weight
    /bias, group{g}.block0.conv_dim.weight, fc.*), (b) a torchvision resnet18/34 state dict, or
    (c) a model.pt7 of imagenet.py; (b) and (c) have their BNs folded at load. Depth, width and
    the number of classes come from the file; all tensors are checked before use."""
    params, names, has_bn = read_weights_file(path)
    stem = 'conv0' if has_bn else 'conv0.weight'
    counts = [len([k for k in params if re.fullmatch(rf'group{g}\.block\d+\.{stem}', k)]) for g in range(4)]
    depth = next((d for d, blocks in IMAGENET_BLOCKS.items() if list(blocks) == counts), None)
    if depth is None or stem not in params or 'fc.weight' not in params:
        raise UserError(f'{path} does not hold a ResNet-18 or ResNet-34 (blocks per group: {counts}); '
                        f'pass weights of one of those')
    with torch.device('meta'):  # shapes only
        expected = define_student(depth, params[stem].shape[0] / 64, params['fc.weight'].shape[0])[1]
    check_tensors(params, expected if has_bn else fold_batch_norm(expected), names, path, f'a ResNet-{depth} teacher')
    check_finite({names.get(k, k): v for k, v in params.items()}, f'teacher {path}',
                 'retrain the teacher or pass other weights as --teacher_params')
    params = fold_batch_norm(params) if has_bn else params
    return teacher_forward(IMAGENET_BLOCKS[depth]), {k: v.float().requires_grad_(False) for k, v in params.items()}

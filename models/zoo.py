"""The CIFAR-100 networks of the CRD paper (Tian et al. 2020) by the names of its tables, and a
loader for the checkpoints its code (RepDistiller) writes, such as its published teachers.

    f, params = zoo.network('resnet32x4', 100)
    teacher = zoo.load_repdistiller('resnet32x4_vanilla/ckpt_epoch_240.pth', 'resnet32x4', 100)
    logits, groups = f(x, teacher, False)

The families live in models/; wrn_* is resnet.resnet, whose function and groups are those of
RepDistiller's WRN, so WRNs trained here and there are interchangeable. Loading is a key map,
REPDISTILLER_NAMES below, and a check of every name and shape before any tensor is used.
"""
import argparse
import os
import re

import torch

from engine.checkpoint import CHECKPOINT, check_finite, load_checkpoint, network_params
from engine.errors import UserError
from models import cifar_resnet, mobilenetv2, resnet_bottleneck, shufflenetv1, shufflenetv2, vgg
from resnet import resnet

NETWORKS = {  # arch -> (family, constructor of num_classes)
    **{f'resnet{d}': ('resnet', lambda c, d=d: cifar_resnet.resnet(d, 1, c))
       for d in (8, 14, 20, 32, 44, 56, 110)},
    'resnet8x4': ('resnet', lambda c: cifar_resnet.resnet(8, 4, c)),
    'resnet32x4': ('resnet', lambda c: cifar_resnet.resnet(32, 4, c)),
    'ResNet50': ('bottleneck', resnet_bottleneck.resnet50),
    **{f'wrn_{d}_{w}': ('wrn', lambda c, d=d, w=w: resnet(d, w, c)) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f'vgg{d}': ('vgg', lambda c, d=d: vgg.vgg(d, c)) for d in (8, 11, 13, 16, 19)},
    'MobileNetV2': ('mobilenetv2', mobilenetv2.mobilenetv2),  # RepDistiller's 'mobile_half'
    'ShuffleV1': ('shufflev1', shufflenetv1.shufflenetv1),
    'ShuffleV2': ('shufflev2', shufflenetv2.shufflenetv2),
}
ARCHS = tuple(NETWORKS)


def network(arch, num_classes):
    """(f, params) for one of ARCHS, f(x, params, mode, base='') -> (logits, groups), or with
    pooled=True (logits, groups, feature), feature the classifier's (B, C) input, or with
    preact=True (logits, groups, feature, the groups before their ReLUs)."""
    if arch not in NETWORKS:
        raise UserError(f'unknown architecture {arch!r}; choose one of {", ".join(ARCHS)}')
    return NETWORKS[arch][1](num_classes)


# Our module names -> RepDistiller's, per family: (pattern, replacement), the first full match
# wins; a replacement function gets the pattern's groups, digits as ints. RepDistiller counts
# layers and convs from 1 where we count from 0, and its nn.Sequential indices count the ReLUs
# (VGG and MobileNetV2: conv, BN, ReLU = 3 entries per conv).
BLOCK = r'group(\d)\.block(\d+)\.'
REPDISTILLER_NAMES = {
    'resnet': [('conv0', 'conv1'), ('bn0', 'bn1'),
               (BLOCK + r'(conv|bn)(\d)', lambda g, i, kind, j: f'layer{g + 1}.{i}.{kind}{j + 1}'),
               (BLOCK + r'shortcut\.conv', lambda g, i: f'layer{g + 1}.{i}.downsample.0'),
               (BLOCK + r'shortcut\.bn', lambda g, i: f'layer{g + 1}.{i}.downsample.1'), ('fc', 'fc')],
    'bottleneck': [('conv0', 'conv1'), ('bn0', 'bn1'),
                   (BLOCK + r'(conv|bn)(\d)', lambda g, i, kind, j: f'layer{g + 1}.{i}.{kind}{j + 1}'),
                   (BLOCK + r'shortcut\.conv', lambda g, i: f'layer{g + 1}.{i}.shortcut.0'),
                   (BLOCK + r'shortcut\.bn', lambda g, i: f'layer{g + 1}.{i}.shortcut.1'), ('fc', 'linear')],
    'wrn': [('conv0', 'conv1'),
            (BLOCK + r'(conv|bn)(\d)', lambda g, i, kind, j: f'block{g + 1}.layer.{i}.{kind}{j + 1}'),
            (BLOCK + 'convdim', lambda g, i: f'block{g + 1}.layer.{i}.convShortcut'),
            ('bn', 'bn1'), ('fc', 'fc')],
    'vgg': [(r'group(\d)\.conv(\d)', lambda g, j: f'block{g}.{3 * j}'),
            (r'group(\d)\.bn(\d)', lambda g, j: f'block{g}.{3 * j + 1}'), ('fc', 'classifier')],
    'mobilenetv2': [('conv0', 'conv1.0'), ('bn0', 'conv1.1'),
                    (BLOCK + r'conv(\d)', lambda s, i, j: f'blocks.{s}.{i}.conv.{3 * j}'),
                    (BLOCK + r'bn(\d)', lambda s, i, j: f'blocks.{s}.{i}.conv.{3 * j + 1}'),
                    ('conv1', 'conv2.0'), ('bn1', 'conv2.1'), ('fc', 'classifier.0')],
    'shufflev1': [('conv0', 'conv1'), ('bn0', 'bn1'),
                  (BLOCK + r'(conv|bn)(\d)', lambda g, i, kind, j: f'layer{g + 1}.{i}.{kind}{j + 1}'),
                  ('fc', 'linear')],
    'shufflev2': [('conv0', 'conv1'), ('bn0', 'bn1'),
                  # the down-sampling unit numbers its convs on across its two branches
                  (BLOCK + r'left\.(conv|bn)(\d)', lambda g, i, kind, j: f'layer{g + 1}.{i}.{kind}{j + 1}'),
                  (BLOCK + r'right\.(conv|bn)(\d)', lambda g, i, kind, j: f'layer{g + 1}.{i}.{kind}{j + 3}'),
                  (BLOCK + r'(conv|bn)(\d)', lambda g, i, kind, j: f'layer{g + 1}.{i}.{kind}{j + 1}'),
                  ('conv1', 'conv2'), ('bn1', 'bn2'), ('fc', 'linear')],
}
TENSORS = ('weight', 'bias', 'running_mean', 'running_var')


def repdistiller_name(arch, name):
    """RepDistiller's state-dict name for our parameter `name` of network `arch`."""
    module, _, tensor = name.rpartition('.')
    if tensor not in TENSORS:  # a bare tensor is a convolution's weight
        module, tensor = name, 'weight'
    for pattern, replacement in REPDISTILLER_NAMES[family(arch)]:
        m = re.fullmatch(pattern, module)
        if m:
            if callable(replacement):
                replacement = replacement(*(int(s) if s.isdigit() else s for s in m.groups()))
            return f'{replacement}.{tensor}'
    raise KeyError(f'{arch} has no RepDistiller name for {name}')


def to_repdistiller(params, arch):
    """Our parameters under RepDistiller's names: a state dict its nn.Module loads (with
    strict=False, as it also expects num_batches_tracked)."""
    return {repdistiller_name(arch, k): v for k, v in params.items()}


def family(arch):
    """The network family of `arch` ('wrn' for cifar.py's --arch wrn): which key map and which
    initialisation (models/init.py) it has."""
    return 'wrn' if arch == 'wrn' else NETWORKS[arch][0]


def load_repdistiller(path, arch, num_classes):
    """Parameters of `arch` from a RepDistiller checkpoint ({'model': state_dict, ...}, or a bare
    state dict; 'module.' prefixes of nn.DataParallel are dropped), under our names, in the file's
    dtype (the run casts them to its own), without gradients (for a teacher). Every name and
    shape is checked first."""
    with torch.device('meta'):  # shapes only
        expected = network(arch, num_classes)[1]
    params = load_network(path, arch, expected, '--teacher_params', 'retrain the teacher or pass another '
                          'checkpoint as --teacher_params')
    return {k: v.requires_grad_(False) for k, v in params.items()}


def load_network(path, arch, expected, flag, fix):
    """The tensors of network `arch` (of which `expected` holds every name and shape, on any
    device) from `path`, under our names and in the file's dtype: a RepDistiller checkpoint, an
    mdistiller one (its distiller's 'student.' tensors, or a bare student) or a model.pt7 of this
    suite (its student). Every name and shape is checked, and every value for NaN and Inf, first."""
    state, ours = read_state_dict(path, flag)
    names = {(k if ours else repdistiller_name(arch, k)): k for k in expected}
    problem = None
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names]
    misshaped = [k for k in names if k in state and state[k].shape != expected[names[k]].shape]
    if missing:
        problem = f'it lacks {missing[0]}'
    elif unexpected:
        problem = f'it has unexpected {unexpected[0]}'
    elif misshaped:
        k = misshaped[0]
        problem = f'{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[names[k]].shape)}'
    if problem:
        num_classes = expected['fc.weight'].shape[0]
        what = 'model.pt7' if ours else 'RepDistiller'
        raise UserError(f'{path} is not a {what} {arch} for {num_classes} classes: {problem}; '
                        f'check the architecture and the number of classes')
    check_finite(state, f'{flag[2:].split("_")[0]} {path}', fix)
    return {names_k: state[k].detach() for k, names_k in names.items()}


def read_state_dict(path, flag='--teacher_params'):
    """(tensors, whether they are under our names): a RepDistiller or mdistiller checkpoint's
    under its names (num_batches_tracked dropped; of an mdistiller distiller, the student's), or
    a model.pt7's student under ours."""
    if path.endswith('.pt7') or os.path.isdir(path):
        state = load_checkpoint(os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path)
        return network_params(state['params']), True
    if not os.path.isfile(path):
        raise UserError(f'RepDistiller checkpoint {path} does not exist; pass a .pth file written by '
                        f'its train_teacher.py or train_student.py as {flag}')
    try:
        # RepDistiller's *_last.pth also holds its argparse options; safe to rebuild, unlike an
        # arbitrary pickle, so allowing that one class keeps weights_only's protection.
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load reports damage through many exception types
        pickled = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if pickled:
            raise UserError(f'{path} holds a pickled {pickled[1]}, which is not loaded as it could run code; '
                            f"save the weights alone: torch.save({{'model': model.state_dict()}}, path)") from None
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f'cannot read RepDistiller checkpoint {path} ({first_line}); expected a '
                        f'file written by torch.save') from None
    state = checkpoint['model'] if isinstance(checkpoint, dict) and 'model' in checkpoint else checkpoint
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'{path} holds no state dict; expected a RepDistiller checkpoint '
                        f"({{'model': state_dict, ...}}) or a state dict saved with torch.save")
    if all(k.startswith('module.') for k in state):  # saved from nn.DataParallel
        state = {k[len('module.'):]: v for k, v in state.items()}
    if any(k.startswith('student.') for k in state):  # an mdistiller distiller: student, teacher, its parts
        state = {k[len('student.'):]: v for k, v in state.items() if k.startswith('student.')}
    return {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}, False

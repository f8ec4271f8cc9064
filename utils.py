"""Functional building blocks over flat parameter dicts.

A network here is a plain function of (input, params, mode); `params` maps names such as
'group0.block0.bn0.weight' to tensors. Batch-norm running statistics live in the same dict
(with requires_grad=False), so the dict alone is the checkpoint.
"""
import torch
import torch.nn.functional as F
from torch.nn.init import kaiming_normal_
from torch.nn.parallel import gather, parallel_apply, scatter
from torch.nn.parallel._functions import Broadcast

from engine import distributed

# The losses lived here in the reference code; scripts that import them from utils still work.
from methods.at import at, at_loss  # noqa: F401
from methods.kd import distillation  # noqa: F401

DTYPES = {'float': torch.float32, 'double': torch.float64,
          'half': torch.float16, 'bfloat16': torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# Parameter constructors: Kaiming-normal convolutions and linear layers, BN scale uniform in
# [0, 1) and zero shift, as in the reference code (keeps old hyper-parameters meaningful).

def conv_params(ni, no, k=1):
    return kaiming_normal_(torch.empty(no, ni, k, k))


def linear_params(ni, no):
    return {'weight': kaiming_normal_(torch.empty(no, ni)), 'bias': torch.zeros(no)}


def bnparams(n):
    return {'weight': torch.rand(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


def flatten(nested, prefix=''):
    """{'a': {'b': t}} -> {'a.b': t}, keeping insertion order (the optimizer's state is indexed
    by position, so the order must match the reference code's for old checkpoints to resume)."""
    flat = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            flat.update(flatten(v, prefix + k + '.'))
        elif v is not None:
            flat[prefix + k] = v
    return flat


def is_running_stat(name):
    return name.endswith('running_mean') or name.endswith('running_var')


def set_requires_grad_except_bn_(params):
    for k, v in params.items():
        v.requires_grad_(not is_running_stat(k))
    return params


def batch_norm(x, params, base, mode):
    """mode: True (training), False (inference) or 'groups' (training here; see head_batch_norm)."""
    weight, bias = params[base + '.weight'], params[base + '.bias']
    mean, var = params[base + '.running_mean'], params[base + '.running_var']
    if mode and distributed.active():
        return distributed.sync_batch_norm(x, weight, bias, mean, var)
    return F.batch_norm(x, mean, var, weight, bias, training=bool(mode))


def head_batch_norm(x, params, base, mode):
    """A batch norm after a network's last group. Mode 'groups' trains the stem and the groups
    only, as RepDistiller's init stage does (its student in eval mode but for get_feat_modules()):
    this norm then runs on its running statistics, which stay, and its scale and shift take no
    gradient, so the init stage leaves it as it was."""
    if mode == 'groups':
        return F.batch_norm(x, params[base + '.running_mean'], params[base + '.running_var'],
                            params[base + '.weight'].detach(), params[base + '.bias'].detach(), training=False)
    return batch_norm(x, params, base, mode)


def cast(params, dtype='float', device=None):
    """Moves a parameter dict (or one tensor) to a device and floating dtype, keeping
    requires_grad. Integer tensors keep their type."""
    if isinstance(params, dict):
        return {k: cast(v, dtype, device) for k, v in params.items()}
    t = params.to(device) if device is not None else params
    if t.is_floating_point():
        t = t.to(DTYPES[dtype])
    return t.detach().requires_grad_(params.requires_grad)


# ----------------------------------------------------------------------------------------------
# Multi-GPU on one machine (--ngpu): split the batch, run a replica of f per GPU, gather.

def data_parallel(f, input, params, mode, device_ids, cache=None):
    """Runs f(input, params, mode) split over `device_ids`; `params` holds the tensors of one
    network. Gradients flow back to `params` through Broadcast. BN running statistics are
    updated from the first GPU's shard only: in training the other replicas have none (batch
    statistics need none), in evaluation they get copies. Tensors without gradient are copied to
    each GPU once and again only after they change (`cache`, kept by the caller across steps),
    so a frozen teacher crosses to each GPU once per run."""
    device_ids = list(device_ids)
    if len(device_ids) <= 1:
        return f(input, params, mode)
    cache = {} if cache is None else cache
    keys = [k for k, v in params.items() if v.requires_grad]
    copies = Broadcast.apply(device_ids, *[params[k] for k in keys]) if keys else []
    replicas = []
    for j, dev in enumerate(device_ids):
        p = {k: copies[j * len(keys) + i] for i, k in enumerate(keys)}
        for k, v in params.items():
            if v.requires_grad:
                continue
            if j == 0:
                p[k] = v
            elif mode and is_running_stat(k):
                p[k] = None
            else:
                version, copy = cache.get((k, dev), (None, None))
                if version != v._version or copy is None:
                    copy = v.to(f'cuda:{dev}', copy=True)
                    cache[k, dev] = (v._version, copy)
                p[k] = copy
        replicas.append(p)
    # parallel_apply enters autocast in each worker thread without a dtype, and the dtype is
    # per thread (fp16 by default): run the replicas in this thread's autocast dtype (bf16).
    autocast = dict(device_type='cuda', dtype=torch.get_autocast_dtype('cuda'),
                    enabled=torch.is_autocast_enabled('cuda'))

    def replica(x, p):
        with torch.autocast(**autocast):
            return f(x, p, mode)

    inputs = scatter(input, device_ids)
    modules = [lambda x, p=p: replica(x, p) for p in replicas[:len(inputs)]]
    outputs = parallel_apply(modules, [(x,) for x in inputs], devices=device_ids[:len(inputs)])
    return gather(outputs, output_device=device_ids[0])


def parameter_counts(params, n_parameters, runs=()):
    """One line of what a run trains: the student's parameters, its teacher's and those of the
    parts its methods learn (each network's, batch-norm statistics included), and a cohort's members."""
    teacher = sum(v.numel() for k, v in params.items() if k.startswith('teacher.'))
    parts = sum(v.numel() for k, v in params.items() if k.startswith('aux.'))
    line = f'Parameters: student {n_parameters:,}' + (f', teacher {teacher:,}' if teacher else '') + \
        (f', learned parts {parts:,}' if parts else '')
    if len(runs) > 1:
        line += f' (the first of a cohort of {len(runs)} students: {", ".join(runs)})'
    return line


def print_tensor_dict(params, n_parameters=None, runs=()):
    """The parameter table printed at start-up: name, shape, dtype, trainable; then the
    student's parameter count (and, for a cohort, its members, each with such a table)."""
    print('\nParameters:')
    width = max(len(k) for k in params)
    for k, v in params.items():
        shape = 'x'.join(str(s) for s in v.shape) or 'scalar'
        grad = '' if v.requires_grad else '  (no grad)'
        print(f'  {k:<{width}}  {shape:<16} {str(v.dtype).replace("torch.", "")}{grad}')
    if n_parameters is not None:
        print(f'\nTotal number of parameters: {n_parameters}')
    if len(runs) > 1:
        print(f'Cohort of {len(runs)} students (the table shows the first): {", ".join(runs)}')

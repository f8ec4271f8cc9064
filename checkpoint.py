"""Run directories: `model.pt7` checkpoints and `log.txt` JSON logs.

A checkpoint is {'params': {name: tensor}, 'optimizer': optimizer.state_dict(), 'epoch': int},
the reference code's layout, so files written by either load in the other; ours add what makes
a continuation identical ('iteration', 'rng', 'lr', 'options'), which the reference code
ignores. It holds only tensors, numbers, strings, lists and dicts: `torch.load(weights_only=True)`
reads it, and that is the only way files are loaded here (a pickle from elsewhere cannot run code).
"""
import json
import os
import random

import numpy as np

import torch
from ignite.handlers import DiskSaver

from errors import UserError

CHECKPOINT = 'model.pt7'
LOG = 'log.txt'
LOG_PREFIX = 'json_stats: '


def save_checkpoint(run_dir, params, optimizer, epoch, **extra):
    """Writes <run_dir>/model.pt7 through a temporary file and a rename, so an interrupted
    write leaves the previous checkpoint intact. `epoch` counts completed epochs."""
    state = {'params': {k: v.detach() for k, v in params.items()},
             'optimizer': optimizer.state_dict(), 'epoch': epoch, **extra}
    DiskSaver(run_dir, atomic=True, require_empty=False)(state, CHECKPOINT)


def rng_state():
    """Every random generator's state, in types that weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if 'cuda' in state and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def load_checkpoint(path):
    """Reads a checkpoint (ours or the reference code's) onto the CPU."""
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist; pass the model.pt7 of an earlier run')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch.load reports damage through many exception types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'cannot read checkpoint {path} ({first_line}); it is corrupt or not a '
                        f'model.pt7 file') from None
    if not isinstance(state, dict) or not isinstance(state.get('params'), dict):
        raise UserError(f'{path} is not a model.pt7 checkpoint (no "params" dict)')
    params = dict(state['params'])
    # The 2017 reference code kept BN running statistics in a separate 'stats' dict.
    params.update(state.get('stats') or {})
    epoch = int(state.get('epoch', 0))
    return {**state, 'params': params, 'optimizer': state.get('optimizer'), 'epoch': epoch,
            'iteration': state.get('iteration')}


def network_params(params, role='student'):
    """One network's tensors from a checkpoint's params: a student run holds its 'student.' and
    'teacher.' networks, a run without teacher holds plain names (its teacher is then empty).
    'aux.' tensors (F-ActT and FitNet regressors, auxiliary heads) serve training only and are
    part of neither network."""
    params = {k: v for k, v in params.items() if not k.startswith('aux.')}
    if not any(k.startswith('student.') for k in params):
        return params if role == 'student' else {}
    prefix = role + '.'
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def copy_params_(params, loaded, source):
    """Copies `loaded` into `params` after checking that names and shapes agree, naming the
    first tensor that does not (a plain copy_ would broadcast a wrongly shaped tensor)."""
    missing = [k for k in params if k not in loaded]
    unexpected = [k for k in loaded if k not in params]
    if missing or unexpected:
        what = f'lacks {missing[0]}' if missing else f'has unexpected {unexpected[0]}'
        raise UserError(f'{source} does not match this model: it {what} '
                        f'({len(missing)} missing, {len(unexpected)} unexpected tensors); '
                        f'check --depth/--width/--dataset against the run that wrote it')
    for k, v in params.items():
        if tuple(loaded[k].shape) != tuple(v.shape):
            raise UserError(f'{source} does not match this model: {k} has shape '
                            f'{tuple(loaded[k].shape)}, expected {tuple(v.shape)}; check '
                            f'--depth/--width/--dataset against the run that wrote it')
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(loaded[k])


def load_optimizer_state(optimizer, state, source):
    """Restores optimizer state after checking that its momentum buffers fit the parameters."""
    trainable = [p for g in optimizer.param_groups for p in g['params']]
    saved_ids = [i for g in state.get('param_groups', []) for i in g['params']]
    if len(saved_ids) != len(trainable):
        raise UserError(f'{source}: optimizer state holds {len(saved_ids)} parameters, this model '
                        f'trains {len(trainable)}; resume with the options of the run that wrote it')
    for p, i in zip(trainable, saved_ids):
        buf = state.get('state', {}).get(i, {}).get('momentum_buffer')
        if buf is not None and tuple(buf.shape) != tuple(p.shape):
            raise UserError(f'{source}: optimizer state for parameter {i} has shape '
                            f'{tuple(buf.shape)}, expected {tuple(p.shape)}')
    optimizer.load_state_dict(state)


def read_log(run_dir):
    """All json_stats records of <run_dir>/log.txt (lines without the prefix are skipped)."""
    path = os.path.join(run_dir, LOG)
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist; train that run first or fix the run name')
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            at = line.find(LOG_PREFIX)
            if at < 0:
                continue
            try:
                records.append(json.loads(line[at + len(LOG_PREFIX):]))
            except json.JSONDecodeError:
                raise UserError(f'{path}:{n} is not a valid json_stats line; repair or remove it') from None
    if not records:
        raise UserError(f'{path} holds no json_stats line; that run never finished an epoch')
    return records


def append_log(run_dir, record):
    with open(os.path.join(run_dir, LOG), 'a') as f:
        f.write(LOG_PREFIX + json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())

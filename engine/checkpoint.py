"""Run directories: `model.pt7` checkpoints and `log.txt` JSON logs.

A checkpoint is {'params': {name: tensor}, 'optimizer': optimizer.state_dict(), 'epoch': int},
the reference code's layout, so files written by either load in the other. Ours name the
parameters of the optimizer's state ('param_names'), so that a resume matches them by name, and
add what makes a continuation identical ('iteration', 'rng', 'lr', 'options') and 'log', the
log.txt line of its last completed epoch, which a resume writes back if the log lost it; the
reference code ignores them. A run with an init stage also has 'init_epochs', its length, and
'init_epochs_done'; its 'epoch' counts main-stage epochs and 'iteration' the steps of both. It
holds only tensors, numbers, strings, lists and dicts: `torch.load(weights_only=True)` reads it,
and that is the only way files are loaded here (a pickle from elsewhere cannot run code).
"""
import io
import json
import os
import random
import sys

import numpy as np
import torch

from engine.errors import UserError
from engine.run_lock import TEMPORARY_PREFIX, TEMPORARY_SUFFIX

CHECKPOINT = 'model.pt7'
LOG = 'log.txt'
LOG_PREFIX = 'json_stats: '


class WriteFailed(OSError):
    """A checkpoint or log line that could not be written (disk full, read-only, quota)."""

    def __init__(self, path, cause):
        super().__init__(f'cannot write {path} ({cause})')
        self.path, self.cause = path, cause


def save_checkpoint(run_dir, params, optimizer, epoch, **extra):
    """Writes <run_dir>/model.pt7 through a temporary file and a rename, so an interrupted or
    failed write leaves the previous checkpoint intact. `epoch` counts completed epochs.

    Not ignite's DiskSaver: its temporary files have random names that nothing can tell from a
    user's, so one left by a killed write could never be cleared. The state is serialised in
    memory first so that a full disk surfaces as one OSError from a plain write, not as
    whichever assertion of the zip writer the short write trips."""
    state = {'params': {k: v.detach() for k, v in params.items()},
             'optimizer': named_state(optimizer, params), 'epoch': epoch, **extra}
    path = os.path.join(run_dir, CHECKPOINT)
    temporary = os.path.join(run_dir, f'{TEMPORARY_PREFIX}{os.getpid()}{TEMPORARY_SUFFIX}')
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(temporary, 'wb') as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        fsync_folder(run_dir)  # makes the rename itself survive a power loss
    except OSError as e:
        raise WriteFailed(path, e.strerror or type(e).__name__) from None
    finally:
        try:
            os.remove(temporary)
        except FileNotFoundError:
            pass


def named_state(optimizer, params):
    """The optimizer's state_dict with the name of each parameter it trains beside its index
    ('param_names', as torch's own optimizers write it when given names), so that a resume matches
    the state to parameters by name, whatever order a later version builds them in. The optimizer
    trains the tensors of `params` that require gradients, in the dict's order."""
    state = optimizer.state_dict()
    names = iter([k for k, v in params.items() if v.requires_grad])
    for group in state['param_groups']:
        group['param_names'] = [next(names) for _ in group['params']]
    return state


def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if is_text(path):
        raise UserError(f'cannot read checkpoint {path}: it is a text file, not a model.pt7 checkpoint; '
                        f'pass the model.pt7 of an earlier run')
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


def is_text(path):
    """Whether a file starts as text does (a log.txt or a JSON file passed by mistake); both
    checkpoint formats start with bytes that are not UTF-8 text."""
    with open(path, 'rb') as f:
        head = f.read(512)
    try:
        head.decode()
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return False
    return bool(head) and b'\0' not in head


def network_params(params, role='student'):
    """One network's tensors from a checkpoint's params: a student run holds its 'student.' and
    'teacher.' networks, a run without teacher holds plain names (its teacher is then empty).
    'aux.' tensors (the parts methods learn beside the student) serve training only and are
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


def check_finite(tensors, source, fix):
    """Refuses a file whose tensors hold NaN or Inf, naming the first such tensor: loaded, it
    would make every loss non-finite and read as the training diverging."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and not bool(t.isfinite().all()):
            what = 'NaN' if bool(t.isnan().any()) else 'Inf'
            raise UserError(f'{source}: {name} holds {what} values; {fix}')


def load_optimizer_state(optimizer, state, source, names=None, saved_params=None):
    """Restores optimizer state after checking that its momentum buffers fit the parameters.
    With `names`, those of the optimizer's parameters in its order, the saved state is matched to
    them by name: the names the checkpoint gives its state (named_state), or for a checkpoint
    without them (the reference code's, or older), the order of its own `saved_params`, which is
    the order its optimizer was built in. Without, by position."""
    trainable = [p for g in optimizer.param_groups for p in g['params']]
    saved_ids = [i for g in state.get('param_groups', []) for i in g['params']]
    if len(saved_ids) != len(trainable):
        raise UserError(f'{source}: optimizer state holds {len(saved_ids)} parameters, this model '
                        f'trains {len(trainable)}; resume with the options of the run that wrote it')
    shown = names or saved_ids
    if names is not None:
        order = saved_param_names(state, saved_params, names)
        missing = [n for n in names if n not in order]
        if missing:
            raise UserError(f'{source}: optimizer state has none for {missing[0]}; resume with the options of the '
                            f'run that wrote it')
        position = {n: i for n, i in zip(order, saved_ids)}
        saved_ids = [position[n] for n in names]
    for p, i, name in zip(trainable, saved_ids, shown):
        buf = state.get('state', {}).get(i, {}).get('momentum_buffer')
        if buf is not None and tuple(buf.shape) != tuple(p.shape):
            raise UserError(f'{source}: optimizer state for {"parameter " if names is None else ""}{name} has shape '
                            f'{tuple(buf.shape)}, expected {tuple(p.shape)}')
    saved = state.get('state', {})
    start, groups = 0, []
    for saved_group, group in zip(state['param_groups'], optimizer.param_groups):
        n = len(group['params'])
        groups.append({**{k: v for k, v in saved_group.items() if k not in ('params', 'param_names')},
                       'params': list(range(start, start + n))})
        start += n
    optimizer.load_state_dict({'state': {new: saved[old] for new, old in enumerate(saved_ids) if old in saved},
                               'param_groups': groups})


def saved_param_names(state, saved_params, names):
    """The names of a saved optimizer state's parameters, in its order."""
    groups = state.get('param_groups', [])
    if groups and all('param_names' in g for g in groups):
        return [n for g in groups for n in g['param_names']]
    trainable = set(names)
    return [k for k in (saved_params or {}) if k in trainable]


def read_log(run_dir):
    """All json_stats records of <run_dir>/log.txt (lines without the prefix are skipped). A log
    that lost its only line (cut short when its run was killed) still has it in the run's
    checkpoint, which keeps its last completed epoch's line."""
    path = os.path.join(run_dir, LOG)
    if not os.path.isfile(path):
        raise UserError(f'{path} does not exist; train that run first or fix the run name')
    records = log_records(path)
    checkpoint = os.path.join(run_dir, CHECKPOINT)
    if not records and os.path.isfile(checkpoint):
        records = [record] if (record := load_checkpoint(checkpoint).get('log')) else []
    if not records:
        raise UserError(f'{path} holds no json_stats line; that run never finished an epoch')
    return records


def log_records(path):
    """The json_stats records of a log file, by the one rule every reader follows: a damaged
    line is an error, except a last line without its newline: a run cut off while appending it
    (power loss, kill -9), or appending it right now, leaves it torn; that one is left out with
    a warning. Lines without the prefix are output of other programs and skipped."""
    with open(path, errors='replace') as f:
        lines = f.readlines()
    records = []
    for n, line in enumerate(lines, 1):
        record = parse_log_line(line)
        if record is None:
            continue
        if record is TORN:
            if n == len(lines) and not line.endswith('\n'):
                print(f'{os.path.basename(sys.argv[0])}: warning: {path}: its last line is cut short (the '
                      f'run stopped while writing it, or is writing it now); left out; resuming the run '
                      f'repairs it', file=sys.stderr, flush=True)
                continue
            raise UserError(f'{path}:{n} is not a valid json_stats line; repair or remove it')
        records.append(record)
    return records


TORN = object()


def parse_log_line(line):
    """A json_stats line's record, None for a line of other output, TORN for a damaged one."""
    at = line.find(LOG_PREFIX)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(LOG_PREFIX):])  # NaN, as the original wrote it, parses
    except ValueError:
        return TORN
    return record if isinstance(record, dict) else TORN


def append_log(run_dir, record):
    path = os.path.join(run_dir, LOG)
    try:
        with open(path, 'a') as f:
            f.write(LOG_PREFIX + json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteFailed(path, e.strerror or type(e).__name__) from None


def repair_log(run_dir, record):
    """Before a run resumes in its folder: drops a torn last line of its log.txt and appends the
    checkpoint's own log line (`record`, its last completed epoch) if the log lacks that epoch,
    as when the run died between writing the checkpoint and appending the line. Returns what
    was done, for the user."""
    path = os.path.join(run_dir, LOG)
    done = []
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            data = f.read()
        start = data.rstrip(b'\n').rfind(b'\n') + 1
        last = data[start:].decode(errors='replace')
        if last and (not last.endswith('\n') or parse_log_line(last) is TORN):
            with open(path, 'r+b') as f:
                f.truncate(start)
                os.fsync(f.fileno())
            done.append('dropped its cut-short last line')
    if record is not None:
        # Runs with an init stage number the epochs of each stage from 1 ('stage' says which).
        logged = {(r.get('stage'), r.get('epoch')) for r in log_records(path)} if os.path.isfile(path) else set()
        if (record.get('stage'), record.get('epoch')) not in logged:
            append_log(run_dir, record)
            what = 'init epoch' if record.get('stage') == 'init' else 'epoch'
            done.append(f'restored the line of {what} {record.get("epoch")} from the checkpoint')
    return f'{path}: {" and ".join(done)}' if done else None

"""The runs one command trains: a single run, or a cohort of students of one teacher.

A cohort (`--cohort MEMBERS`) trains many students in lock-step: every member sees the same
batches (one data stream, seeded by --data_seed) and the teacher runs once per batch for all of
them. Each member is an ordinary run: its options are the command line's with its own
per-student loss options and seed, its directory is <--save>/<name>/, and its log.txt and
model.pt7 are what a single run with those options writes. A single run is a cohort of one
whose directory is --save itself.

MEMBERS is a JSON list, inline or @file, of objects such as
    {"name": "at-1", "seed": 1, "beta": 1e3}
"""
import argparse
import json
import os
import random

import numpy as np
import torch

import methods
from engine import distributed, tensorboard_log
from engine.checkpoint import CHECKPOINT, LOG, load_checkpoint
from engine.devices import choose_device
from engine.errors import UserError
from engine.options import CHANGEABLE_ON_RESUME, check_run_options, resolve_init_stage
from engine.rules import shown
from engine.run_lock import LOCK, lock_run_dir
from engine.tensorboard_log import TB_DIR

# What may differ between the members of a cohort: the loss (every flag of the transfer methods and
# their init stage), the initialisation and the learning rate (methods' authors tune it with their
# weights; its decays stay shared). Everything else (architecture, teacher, data, schedule,
# precision) is shared.
MEMBER_OPTIONS = ('seed', 'lr', *(f.name for f in methods.flags()))
# The cohort's list of members, kept in its folder when it starts: `--resume DIR` alone goes on with it.
MEMBERS = 'members.json'
# What a cohort's folder holds besides its members' folders.
OWN_FILES = (MEMBERS, LOG, CHECKPOINT, LOCK, TB_DIR)


def read_members(text):
    """The list of member objects of a --cohort value (JSON, or @path of a JSON file)."""
    source = '--cohort'
    if text.startswith('@'):
        source = text[1:]
        try:
            with open(source) as f:
                text = f.read()
        except OSError as e:
            raise UserError(f'--cohort {text}: cannot read {source} ({e.strerror}); name a JSON file '
                            f'of member objects') from None
    try:
        members = json.loads(text)
    except ValueError as e:
        raise UserError(f'{source} is not valid JSON ({e}); give a list of member objects, e.g. '
                        f'[{{"name": "at-1", "seed": 1, "beta": 1000}}]') from None
    except RecursionError:  # json nests by recursion: thousands of brackets exhaust the stack
        raise UserError(f'{source} nests JSON too deeply to read; give a flat list of member objects, e.g. '
                        f'[{{"name": "at-1", "seed": 1, "beta": 1000}}]') from None
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise UserError(f'{source} is not a non-empty JSON list of member objects, e.g. '
                        f'[{{"name": "at-1", "seed": 1, "beta": 1000}}]')
    return members


def check_name(name, names):
    if not isinstance(name, str) or not name or name in ('.', '..') or '/' in name or '\\' in name:
        raise UserError(f'--cohort member name {name!r} is not a folder name; give each member a '
                        f'"name" such as "at-1" (its run goes to <--save>/<name>/)')
    if name in OWN_FILES:
        raise UserError(f'--cohort member name {name!r} is a file the cohort\'s folder holds itself; give the '
                        f'member another "name" (its run goes to <--save>/<name>/)')
    if name in names:
        raise UserError(f'--cohort names two members {name!r}; each member needs its own "name"')


def resumed_options(opt, given):
    """The options of a command that resumes (--resume): those the command line does not give
    (`given`) are the ones the checkpoint was trained with, a single run's or each member's of a
    cohort, so that `--resume DIR` alone goes on as the run started. A value the command line gives
    that differs from the checkpoint's is refused, unless it only says where, how fast or how long
    the run goes (CHANGEABLE_ON_RESUME). --save defaults to the folder resumed."""
    if not opt.resume:
        return opt
    folder = opt.resume if os.path.isdir(opt.resume) else None
    if opt.cohort or folder and os.path.isfile(os.path.join(folder, MEMBERS)):
        return resumed_cohort(opt, given, folder) if folder else opt  # member_runs refuses a file
    opt.resume = path = os.path.join(folder, CHECKPOINT) if folder else opt.resume
    if 'save' not in given:
        opt.save = os.path.dirname(path) or '.'
    if not os.path.isfile(path):
        return opt  # check_paths says what is wrong with it
    take_recorded(opt, load_checkpoint(path).get('options') or {}, given, path)
    return opt


def resumed_cohort(opt, given, folder):
    """resumed_options of a cohort: the members of --cohort, or of the list it keeps in its folder;
    the shared options recorded by its first member with a checkpoint, each member's own by its
    checkpoint."""
    if 'save' not in given:
        opt.save = folder
    if not opt.cohort:
        opt.cohort = '@' + os.path.join(folder, MEMBERS)
    members = read_members(opt.cohort)
    shared = set(vars(opt)) - set(MEMBER_OPTIONS)
    for member in members:
        path = os.path.join(folder, str(member.get('name')), CHECKPOINT)
        if not isinstance(member.get('name'), str) or not os.path.isfile(path):
            continue  # a member that had not started: it starts now, with the options it is given
        record = load_checkpoint(path).get('options') or {}
        if shared:
            take_recorded(opt, record, given, path, shared)
            shared = set()
        for k in MEMBER_OPTIONS:
            if k in record and k not in member and k not in given:
                member[k] = record[k]
            elif k in record and member.get(k, getattr(opt, k)) != record[k]:
                value = member.get(k, getattr(opt, k))
                raise UserError(f'--cohort member {member["name"]!r}: {refusal(k, value, record[k], path)}')
    opt.cohort = json.dumps(members)
    return opt


def take_recorded(opt, record, given, source, keys=None):
    for k in keys if keys is not None else vars(opt):
        if k not in record or k in ('resume', 'save', 'cohort'):
            continue
        if k not in given:
            setattr(opt, k, record[k])
        elif getattr(opt, k) != record[k] and k not in CHANGEABLE_ON_RESUME:
            raise UserError(refusal(k, getattr(opt, k), record[k], source))


def refusal(flag, value, recorded, source):
    return (f'--{flag}{shown(value)} differs from the{shown(recorded)} that {source} was trained with; a resumed run '
            f'goes on with what it learned with (only {", ".join("--" + k for k in CHANGEABLE_ON_RESUME)} may '
            f'change): drop --{flag}, or start a new run')


def check_options(opt, rules, teacher_flag):
    """Refuses, before anything is loaded or written, any option outside its rule and the
    combinations that cannot train; for a cohort, the same for every member's options."""
    check_run_options(opt, rules, teacher_flag)
    if opt.tensorboard == 'on' and not tensorboard_log.available():
        raise UserError('--tensorboard on needs the tensorboard package, which is not installed; '
                        'pip install tensorboard, or use --tensorboard auto or off')
    if opt.cohort:
        member_runs(opt, rules, teacher_flag)
    else:
        check_members([opt], cohort=False)


def member_runs(opt, rules, teacher_flag):
    """The option namespace of each run this command trains, each checked with the script's
    rules, its init stage settled. Seeds may still be None here (drawn later)."""
    if not opt.cohort:
        check_members([opt], cohort=False)
        return [resolve_init_stage(opt)]
    if opt.compile_mode == 'reduce-overhead':
        raise UserError('--compile_mode reduce-overhead records CUDA graphs for one run; use '
                        '--compile_mode default with --cohort')
    if opt.resume and os.path.normpath(opt.resume) != os.path.normpath(opt.save):
        raise UserError(f'--cohort resumes every member from its own folder: pass the cohort\'s '
                        f'directory, --resume {opt.save}, not --resume {opt.resume}')
    runs, names = [], set()
    for member in read_members(opt.cohort):
        name = member.get('name')
        check_name(name, names)
        names.add(name)
        unknown = sorted(set(member) - {'name', *MEMBER_OPTIONS})
        if unknown:
            raise UserError(f'--cohort member {name!r} has unknown key {unknown[0]!r}; a member may set '
                            f'"name" and {", ".join(MEMBER_OPTIONS)}; the rest comes from the command line')
        run = argparse.Namespace(**{**vars(opt), **{k: v for k, v in member.items() if k != 'name'}})
        run.save = os.path.join(opt.save, name)
        # A member resumes from its own checkpoint when it has one (it may not have finished an
        # epoch before the cohort stopped).
        run.resume = os.path.join(run.save, CHECKPOINT) if opt.resume and os.path.isfile(
            os.path.join(run.save, CHECKPOINT)) else ''
        run.cohort = opt.save  # each line names the cohort its run belonged to
        try:
            check_run_options(run, rules, teacher_flag)
        except UserError as e:
            raise UserError(f'--cohort member {name!r}: {e}') from None
        runs.append(resolve_init_stage(run))
    check_members(runs)
    # Members share one teacher: one in training mode would move the statistics of everyone's.
    training = [os.path.basename(run.save) for run in runs if methods.teacher_trains(run)]
    if training and len(training) < len(runs):
        raise UserError(f'--cohort member {training[0]!r} runs the teacher in training mode, as its method\'s '
                        f'reference does, which moves the running statistics of the teacher every member shares; '
                        f'ask it of every member or of none, or train that member in a run of its own')
    return runs


def check_members(runs, cohort=True):
    """What each run's methods need of the cohort's other members (Method.refuse_members: a peer
    to learn from, say); a single run (cohort False) has none."""
    for run in runs:
        others = [other for other in runs if other is not run] if cohort else None
        try:
            for m in methods.all_methods():
                m.refuse_members(run, others)
        except UserError as e:
            raise UserError(f'--cohort member {os.path.basename(run.save)!r}: {e}' if cohort else str(e)) from None


def check_run_dir(run):
    """A run's directory is new, or the run being resumed: never append to another run's log."""
    existing = [n for n in (LOG, CHECKPOINT) if os.path.exists(os.path.join(run.save, n))]
    if existing and not run.resume:
        if run.cohort:
            how = f'pass --resume {run.cohort} to continue the cohort'
            if CHECKPOINT not in existing:
                how = f'its {LOG} has no {CHECKPOINT} beside it; move the folder away'
        else:
            how = f'pass --resume {os.path.join(run.save, CHECKPOINT)} to continue it'
        raise UserError(f'{run.save} already holds a run ({", ".join(existing)}); {how} or choose '
                        f'another --save')
    if run.resume:
        state = load_checkpoint(run.resume)  # fail now, before anything is created, if unreadable
        trained = state.get('init_epochs', 0)  # absent: a run without init stage (or the reference code's)
        if trained != run.init_epochs:
            raise UserError(f'{run.resume} was trained with an init stage of {trained} epochs, and this run has '
                            f'{run.init_epochs}; resume with --init_epochs {trained}, or start a new run')
        return state


def resolve_seeds(opt, runs, states):
    """Every run's seed: given, the one a resumed run was started with, or drawn (and logged).
    The data stream's seed defaults to the single run's seed or the first member's."""
    for run, state in zip(runs, states):
        if run.seed is None:
            run.seed = (state or {}).get('options', {}).get('seed')
        if run.seed is None:
            run.seed = distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31))
    if opt.data_seed is None:
        resumed = (states[0] or {}).get('options', {}).get('data_seed')
        opt.data_seed = resumed if resumed is not None else runs[0].seed
    if not opt.cohort:
        opt.seed = runs[0].seed
    for run in runs:
        run.data_seed = opt.data_seed


def seed_generators(seed):
    """Seeds every generator a run draws from while it builds its networks."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def start_runs(opt, rules, teacher_flag):
    """What every command does before it loads data: report its options, refuse bad ones, join
    torchrun's processes, lock the run directories and refuse occupied ones before anything is
    written, settle the seeds. Returns the device and the option namespace of each run."""
    runs = member_runs(opt, rules, teacher_flag)
    device = choose_device(opt)
    lock_run_dirs(opt, runs)
    states = [check_run_dir(run) for run in runs]
    resolve_seeds(opt, runs, states)
    return device, runs


def keep_members(opt):
    """<cohort>/members.json: the members a cohort trains, with the options each one trains with,
    written as it starts training (a command refused or stopped before leaves none), so that
    `--resume DIR` alone goes on with them."""
    path = os.path.join(opt.save, MEMBERS)
    with open(path + '.tmp', 'w') as f:
        json.dump(read_members(opt.cohort), f, indent=1)
    os.replace(path + '.tmp', path)


def lock_run_dirs(opt, runs):
    """Claims every folder this command writes (the cohort's own and each member's) before
    any is read: two commands checking the same empty folder would otherwise both find it
    free. Only rank 0 writes, so only rank 0 locks; a refusal ends every rank."""
    refusal = None
    if distributed.is_main():
        try:
            for run_dir in dict.fromkeys([opt.save, *(run.save for run in runs)]):
                lock_run_dir(run_dir)
        except UserError as e:
            refusal = str(e)
    refusal = distributed.broadcast_object(refusal)
    if refusal:
        raise UserError(refusal)

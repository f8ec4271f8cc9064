"""What every option of cifar.py and imagenet.py accepts, checked before anything is loaded or
written.

`RULES` maps each flag both scripts share to a rule: the type its value must have, a predicate,
and the accepted range in words, from which the one-line error is made; `CIFAR_RULES` and
`IMAGENET_RULES` add the flags of each script. `check_option(flag, value)` applies one rule to
one value, so options that arrive some other way than the command line (numbers read from JSON,
say) meet the same rules. `check_run_options` applies a script's whole table, then the checks that
involve several flags; `check_paths` looks at the files and folders the options name without
reading any data or writing anything.
"""
import argparse
import json
import os
import re
from types import SimpleNamespace

import methods
from datasets.cifar import CROP_PADDING, NORMALIZATION, NUM_CLASSES
from engine import distributed, tensorboard_log
from engine.checkpoint import CHECKPOINT, LOG, read_log
from engine.devices import cpu_has_bf16
from engine.errors import UserError
from engine.rules import (
    ANY_TEXT,
    INTEGER,
    NUMBER,
    OPTIONAL_INTEGER,
    SWITCH_RULE,
    TEXT,
    Rule,
    choice,
)
from engine.rules import check_option as check_rule
from methods.base import DEFAULT_INIT_EPOCHS
from models.init import INITS
from models.zoo import ARCHS
from resnet import IMAGENET_BLOCKS, STUDENT_FILES, wrn_block_count
from utils import DTYPES

# numpy's legacy generator takes seeds below 2**32, and the loaders seed torch generators with
# seed * 100003 + epoch, which must stay below 2**64: 2**32 keeps both. A drawn seed is below 2**31.
SEED_LIMIT = 2 ** 32
# CUDA_VISIBLE_DEVICES entries: indices (-1 hides every GPU) or GPU/MIG UUIDs.
GPU = r'(-?\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)'
GPU_IDS = re.compile(f'{GPU}(,{GPU})*')
PRECISIONS = ['auto', 'bf16', 'fp32']


# What may differ when a run resumes: where, how fast and how long it runs. Everything else shapes
# what it learns, and a resume with another value is refused (cohort.resumed_options).
CHANGEABLE_ON_RESUME = ('epochs', 'dataroot', 'imagenetpath', 'teacher_params', 'student_params', 'nthread',
                        'reference', 'precision', 'compile', 'compile_mode', 'deterministic', 'cuda', 'ngpu', 'gpu_id',
                        'tensorboard', 'tensorboard_every', 'param_table')


def given_flags(parser, argv=None):
    """The destinations of the flags that `argv` gives (argparse fills in every other one with its
    default, unless the namespace already holds it)."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, namespace)
    return {k for k, v in vars(namespace).items() if v is not unset}


def epoch_steps(text):
    """The epochs of an --epoch_step text, or None unless it is a JSON list of strictly
    increasing epochs >= 1. Epochs count from 1, so a step at 0 would only rescale --lr; a
    repeated epoch would decay twice at once and an unsorted list is most likely a typo, so both
    are refused rather than guessed at."""
    try:
        steps = json.loads(text)
    except ValueError:
        return None
    if not isinstance(steps, list) or not all(type(s) is int and s >= 1 for s in steps):
        return None
    return steps if all(a < b for a, b in zip(steps, steps[1:])) else None


def teacher_name(name):
    """No teacher, or a run under logs/: relative, and never leaving logs/ (table1.sh nests
    runs in folders, so a name may hold slashes)."""
    return name == '' or not os.path.isabs(name) and '..' not in name.split('/') and os.path.normpath(name) != '.'


# ----------------------------------------------------------------------------------------------
# The flags both scripts share

def add_common_arguments(p):
    """The flags cifar.py and imagenet.py share, with the reference code's defaults: the transfer
    methods' (methods/), then the run's."""
    methods.add_arguments(p)
    p.add_argument('--momentum_at_decay', default='restart', type=str,
                   help="SGD's momentum where the learning rate drops (--epoch_step): restart (the AT code, which "
                        "builds a new optimizer there) or keep (RepDistiller, which lowers the rate in place)")
    p.add_argument('--seed', default=None, type=int, help='random seed (drawn and logged if omitted)')
    p.add_argument('--data_seed', default=None, type=int,
                   help="seed of the batches' order and augmentation (default: --seed, or the first "
                        "cohort member's seed)")
    p.add_argument('--cohort', default='', type=str, metavar='MEMBERS',
                   help='train several students of one teacher in lock-step: a JSON list (or @file) '
                        'of {"name": ..., "seed": ..., "beta": ...}; each member runs in <--save>/<name>/')
    # Speed
    p.add_argument('--reference', action='store_true',
                   help='fp32, NCHW, plain SGD: the original arithmetic (default: bf16 autocast and '
                        'channels_last where the hardware is fast at them)')
    p.add_argument('--precision', default='auto', choices=PRECISIONS,
                   help='training precision of the fast path: bf16 autocast, fp32, or auto (bf16 where '
                        'the CPU or GPU has bf16 units); evaluation is always fp32')
    p.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'],
                   help='torch.compile the forward and loss (auto: for runs of 10 or more epochs)')
    p.add_argument('--compile_mode', default='default', choices=['default', 'reduce-overhead'],
                   help='torch.compile mode; reduce-overhead replays the step as a CUDA graph')
    p.add_argument('--deterministic', action='store_true',
                   help='deterministic GPU kernels: a resumed run repeats an uninterrupted one bit '
                        'for bit on CUDA too (slower)')
    # Device options
    p.add_argument('--cuda', action='store_true', help='require a GPU (one is used whenever present)')
    p.add_argument('--save', default='', type=str, help='save parameters and logs in this folder')
    p.add_argument('--ngpu', default=1, type=int, help='number of GPUs to use for training')
    p.add_argument('--gpu_id', default='', type=str,
                   help='GPU id(s) to use, e.g. 0 or 0,1; sets CUDA_VISIBLE_DEVICES (default: '
                        'leave it as it is)')
    # Live curves
    p.add_argument('--tensorboard', default='auto', choices=tensorboard_log.CHOICES,
                   help='write TensorBoard curves of each run to <save>/tb/ (auto: where the tensorboard '
                        'package is installed)')
    p.add_argument('--param_table', action='store_true',
                   help='print every tensor of the parameter dict (name, shape, type) at the start')
    p.add_argument('--tensorboard_every', default=50, type=int, metavar='N',
                   help='write the training loss to the curves every N steps (the epoch points come after '
                        'each epoch)')


# Flags of both scripts.
RULES = {
    'dtype': choice(sorted(DTYPES)),
    'nthread': Rule(INTEGER, lambda v: v >= 0, 'is negative', 'use 0 (decode in this process) or more'),
    'batch_size': Rule(INTEGER, lambda v: v >= 1, 'is below 1', 'use a batch of at least one image, e.g. 128'),
    'lr': Rule(NUMBER, lambda v: v > 0, 'is not positive', 'use a learning rate > 0, e.g. 0.1'),
    'epochs': Rule(INTEGER, lambda v: v >= 1, 'is below 1', 'use at least 1 epoch'),
    'weight_decay': Rule(NUMBER, lambda v: v >= 0, 'is negative', 'use 0 (off) or a positive weight decay, e.g. 5e-4'),
    'epoch_step': Rule(TEXT, lambda v: epoch_steps(v) is not None,
                       'is not a JSON list of strictly increasing epochs >= 1',
                       'use e.g. "[60,120,160]", or "[]" to keep --lr constant'),
    'lr_decay_ratio': Rule(NUMBER, lambda v: v > 0, 'is not positive',
                           'use a ratio > 0, e.g. 0.2, or 1 to keep --lr constant'),
    'resume': ANY_TEXT,
    'momentum_at_decay': choice(['restart', 'keep']),
    **methods.rules(),
    'seed': Rule(OPTIONAL_INTEGER, lambda v: v is None or 0 <= v < SEED_LIMIT, 'is outside [0, 2**32)',
                 f'use a seed from 0 to {SEED_LIMIT - 1}, or leave --seed out to draw one'),
    'data_seed': Rule(OPTIONAL_INTEGER, lambda v: v is None or 0 <= v < SEED_LIMIT, 'is outside [0, 2**32)',
                      f'use a seed from 0 to {SEED_LIMIT - 1}, or leave --data_seed out'),
    'cohort': ANY_TEXT,  # its members are checked one by one (cohort.py)
    'reference': SWITCH_RULE,
    'precision': choice(PRECISIONS),
    'compile': choice(['auto', 'on', 'off']),
    'compile_mode': choice(['default', 'reduce-overhead']),
    'deterministic': SWITCH_RULE,
    'cuda': SWITCH_RULE,
    'save': ANY_TEXT,
    'ngpu': Rule(INTEGER, lambda v: v >= 1, 'is below 1', 'use 1, or the number of GPUs to split each batch over'),
    'gpu_id': Rule(TEXT, lambda v: v == '' or GPU_IDS.fullmatch(v) is not None,
                   'is not a comma-separated list of GPU ids', 'use e.g. 0 or 0,1'),
    'tensorboard': choice(tensorboard_log.CHOICES),
    'param_table': SWITCH_RULE,
    'tensorboard_every': Rule(INTEGER, lambda v: v >= 1, 'is below 1',
                              'write the training loss every N >= 1 steps, e.g. 50'),
}

CIFAR_RULES = {
    'depth': Rule(INTEGER, lambda v: wrn_block_count(v) is not None, 'is not 6n+4 (n >= 1)',
                  'use e.g. 16, 22, 28 or 40'),
    # The first group of a WRN has 16 * width channels.
    'width': Rule(NUMBER, lambda v: v > 0 and int(16 * v) >= 1, 'gives no channels',
                  'use a positive width such as 1 or 2'),
    'dataset': choice(sorted(NUM_CLASSES)),
    'dataroot': ANY_TEXT,
    'teacher_id': Rule(TEXT, teacher_name, 'is not a run name under logs/',
                       'use a relative name without "..", e.g. wrn16-2 or table1/teacher_wrn16-2'),
    # Reflect padding mirrors pixels inside the image, so it cannot be as wide as the image.
    **{f'{split}_per_class': Rule(INTEGER, lambda v: v >= 0, 'is negative',
                                  f'use the number of {split} images of each class to keep, or 0 for all')
       for split in ('train', 'test')},
    'randomcrop_pad': Rule(NUMBER, lambda v: v == int(v) and 0 <= v < 32, 'is not a whole number in [0, 32)',
                           'use 0 (no crop) up to 31 pixels of padding on the 32x32 images, e.g. 4'),
    'crop_padding': choice(CROP_PADDING),
    'augment': choice(['on', 'off']),
    'init': choice(list(INITS)),
    'student_params': ANY_TEXT,  # read and checked against --arch before the data
    'normalization': choice(sorted(NORMALIZATION)),
    'arch': Rule(TEXT, lambda v: v == 'wrn' or v in ARCHS, 'is not a network here',
                 f'use wrn (sized by --depth and --width) or one of {", ".join(ARCHS)}'),
    'teacher_arch': Rule(TEXT, lambda v: v == '' or v in ARCHS, 'is not a network of the CRD benchmark',
                         f'name the network of --teacher_params: one of {", ".join(ARCHS)}'),
    'teacher_params': ANY_TEXT,  # with --teacher_arch: check_cifar_networks
    **RULES,
}

IMAGENET_RULES = {
    'imagenetpath': Rule(TEXT, lambda v: v != '', 'is required',
                         'name a folder with train/<class>/ and val/<class>/ images'),
    'depth': Rule(INTEGER, lambda v: v in IMAGENET_BLOCKS, 'is not an ImageNet ResNet here', 'use 18 or 34'),
    # The stem of a ResNet has 64 * width channels.
    'width': Rule(NUMBER, lambda v: v > 0 and int(64 * v) >= 1, 'gives no channels',
                  'use a positive width such as 1'),
    'teacher_params': ANY_TEXT,
    'student_params': ANY_TEXT,  # read and checked against --depth and --width before the data
    **RULES,
    # The ImageNet ResNets hand out no pre-ReLU groups (the teacher's batch norms are folded away).
    **{m.weight: Rule(NUMBER, lambda v: v == 0,
                      'reads pre-ReLU group outputs, which the ImageNet ResNets do not hand out',
                      'leave it at 0 with imagenet.py (cifar.py networks have them)')
       for m in methods.all_methods() if 'preact' in m.reads},
    # Its loader decodes each image once, in worker processes, with no second view.
    **{m.weight: Rule(NUMBER, lambda v: v == 0,
                      'trains on a strongly augmented second view of each batch, which imagenet.py does not make',
                      'leave it at 0 with imagenet.py (cifar.py makes the view)')
       for m in methods.all_methods() if 'strong_view' in m.reads},
}


def check_option(flag, value, rules=RULES):
    """Returns `value` if the rule of --flag accepts it; otherwise raises a one-line UserError
    naming the flag, the value and what is accepted (rules.check_option)."""
    return check_rule(flag, value, rules)


def check_run_options(opt, rules, teacher_flag):
    """`teacher_flag` names the flag that gives a teacher, or a tuple of flags that each can."""
    for flag in rules:
        check_option(flag, getattr(opt, flag), rules)
    flags = (teacher_flag,) if isinstance(teacher_flag, str) else teacher_flag
    check_transfer_options(opt, any(getattr(opt, f) for f in flags), ' or '.join('--' + f for f in flags))
    check_init_stage(opt)
    check_precision(opt)


def check_init_stage(opt):
    """The init stage's options need a method that has one, and a method that trains only there
    needs the stage."""
    staged = methods.with_init_stage()
    if not any(methods.on(opt, m) for m in staged):
        names = ', '.join('--' + m.weight for m in staged)
        for flag in ('init_epochs', 'init_lr'):
            if getattr(opt, flag):
                raise UserError(f'--{flag} {getattr(opt, flag):g} sets the init stage of {names}, and none of '
                                f'them is on; add one of them or drop --{flag}')
    for m in staged:
        if m.init_only and methods.on(opt, m) and opt.init_epochs == 0:
            raise UserError(f'--{m.weight} trains only in the init stage, and --init_epochs 0 gives it none; drop '
                            f'--init_epochs 0 (default {DEFAULT_INIT_EPOCHS}) or --{m.weight}')
    if opt.init_lr is not None and opt.init_epochs == 0:
        raise UserError(f'--init_lr {opt.init_lr:g} is the learning rate of the init stage, and --init_epochs 0 '
                        f'gives the run none; drop --init_lr or --init_epochs 0')


def resolve_init_stage(opt):
    """Settles a run's --init_epochs (RepDistiller's 30 with a method that has an init stage, else
    0) and, with an init stage, its --init_lr (default --lr), so that its log lines say what it
    trained with."""
    if opt.init_epochs is None:
        opt.init_epochs = DEFAULT_INIT_EPOCHS if any(methods.on(opt, m) for m in methods.with_init_stage()) else 0
    if opt.init_epochs and opt.init_lr is None:
        opt.init_lr = opt.lr
    return opt


def check_precision(opt):
    """--precision chooses the fast path's training precision; --reference (the original fp32
    arithmetic) and --dtype (every tensor in one type) already fix it, so a contradicting
    --precision is refused rather than one of them silently winning."""
    if opt.precision == 'bf16' and opt.reference:
        raise UserError('--reference trains in fp32, the original arithmetic; drop --precision bf16, '
                        'or drop --reference to train under bf16 autocast on the fast path')
    if opt.precision != 'auto' and opt.dtype != 'float':
        raise UserError(f'--dtype {opt.dtype} keeps every tensor in {opt.dtype}; drop --precision '
                        f'{opt.precision}, or use --dtype float to choose the training precision')
    cpu_has_bf16()  # a bad AT_CPU_BF16 is refused now, before any data is loaded


def check_cifar_networks(opt):
    """cifar.py's networks: --depth and --width size only the WRN of --arch wrn, and a teacher
    is either a run here (--teacher_id) or a RepDistiller checkpoint with its architecture
    (--teacher_params and --teacher_arch), which does not record the network it holds."""
    if opt.arch != 'wrn':
        for flag, default in (('depth', 16), ('width', 1)):
            if getattr(opt, flag) != default:
                raise UserError(f'--{flag} sizes the Wide ResNet of --arch wrn, but --arch {opt.arch} is a '
                                f'fixed network; drop --{flag} {getattr(opt, flag):g}, or use --arch wrn')
    if opt.teacher_params and opt.teacher_id:
        raise UserError('--teacher_id and --teacher_params both name a teacher; give one: a run here '
                        '(--teacher_id) or a RepDistiller checkpoint (--teacher_params with --teacher_arch)')
    if opt.teacher_params and not opt.teacher_arch:
        raise UserError(f'--teacher_params {opt.teacher_params} needs --teacher_arch: a RepDistiller '
                        f'checkpoint does not say which network it holds; add e.g. --teacher_arch resnet32x4')
    if opt.teacher_arch and not opt.teacher_params:
        raise UserError(f'--teacher_arch {opt.teacher_arch} names the network of a --teacher_params file, '
                        f'and none is given; add --teacher_params FILE or drop --teacher_arch')


def check_transfer_options(opt, has_teacher, teacher_flag):
    """Refuses, before anything runs, combinations of the methods' options that cannot train."""
    for f in methods.flags():
        check_option(f.name, getattr(opt, f.name))
        if f.needs_teacher and getattr(opt, f.name) and not has_teacher:
            raise UserError(f'--{f.name} compares the student with a teacher; give {teacher_flag} or drop --{f.name}')
    if methods.double_backward(opt):
        twice = ' and '.join('--' + m.weight for m in methods.all_methods() if 'input_gradient' in m.reads)
        if opt.compile == 'on':
            raise UserError(f'{twice} differentiate twice, which torch.compile cannot; use --compile auto or off')
        if opt.ngpu > 1:
            raise UserError(f'{twice} cannot split batches over GPUs with --ngpu; use torchrun with one process per '
                            f'GPU and --ngpu 1')
    context = SimpleNamespace(has_teacher=has_teacher, torchrun=distributed.launched_by_torchrun())
    for m in methods.all_methods():
        m.refuse(opt, context)


# ----------------------------------------------------------------------------------------------
# Files and folders the options name

def check_paths(opt):
    """Looks at what --save, --resume, the teacher flag and the data flag name, reading no data
    and writing nothing, so that a run which cannot finish stops before it loads anything."""
    check_save(opt.save)
    if opt.resume and not opt.cohort:  # a cohort resumes from its directory (cohort.py)
        check_resume(opt.resume)
    if getattr(opt, 'teacher_id', ''):
        check_teacher_run(opt.teacher_id)
    if getattr(opt, 'teacher_params', ''):
        check_teacher_file(opt.teacher_params, REPDISTILLER_TEACHER if hasattr(opt, 'teacher_arch') else
                           IMAGENET_TEACHER)
    if getattr(opt, 'student_params', '') and not opt.resume:  # a resumed student is its checkpoint's
        check_student_file(opt.student_params, REPDISTILLER_STUDENT if hasattr(opt, 'teacher_arch') else
                           IMAGENET_STUDENT)
    for flag in ('dataroot', 'imagenetpath'):
        if getattr(opt, flag, ''):
            check_folder(flag, getattr(opt, flag))


def nearest_existing(path):
    """`path` itself or its closest existing parent."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_save(save):
    if not save:
        raise UserError('--save is required: name a directory for the log and checkpoint, '
                        'e.g. --save logs/wrn16-1')
    where = f"name a directory for the run's {LOG} and {CHECKPOINT}, e.g. --save logs/wrn16-1"
    if os.path.exists(save) and not os.path.isdir(save):
        raise UserError(f'--save {save} is a file; {where}')
    existing = nearest_existing(save)
    if not os.path.isdir(existing):
        raise UserError(f'--save {save} lies inside {existing}, which is a file; {where}')
    # The first checkpoint is written after an epoch: find out now that it cannot be.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'--save {save} cannot be written: {existing} is not writable; {where}')


def check_resume(path):
    if not os.path.isfile(path):
        raise UserError(f'--resume {path} does not exist; pass the {CHECKPOINT} of an earlier run')


def check_teacher_run(teacher_id):
    """cifar.py's teacher is a finished run: logs/<id>/ with a readable log and a checkpoint."""
    run_dir = os.path.join('logs', teacher_id)
    if not os.path.isdir(run_dir):
        raise UserError(f'teacher {run_dir} does not exist; train the teacher with '
                        f'--save {run_dir} first or fix --teacher_id')
    read_log(run_dir)  # small; a damaged log is better reported now than after loading the data
    if not os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        raise UserError(f'teacher {run_dir} has no {CHECKPOINT}; let the teacher finish an epoch '
                        f'or fix --teacher_id')


IMAGENET_TEACHER = 'pass a torchvision resnet18/34 state dict, the BN-folded export or a model.pt7 as --teacher_params'
REPDISTILLER_TEACHER = ('pass a RepDistiller checkpoint such as resnet32x4_vanilla/ckpt_epoch_240.pth '
                        'as --teacher_params')


def check_teacher_file(path, what):
    if os.path.isdir(path):
        raise UserError(f'teacher weights {path} is a directory; {what}')
    if not os.path.isfile(path):
        raise UserError(f'teacher weights {path} do not exist; {what}')


REPDISTILLER_STUDENT = ('pass a RepDistiller or mdistiller checkpoint of --arch, or a model.pt7 of this suite (or '
                        'its run folder), as --student_params')
IMAGENET_STUDENT = f'pass {STUDENT_FILES}'


def check_student_file(path, what):
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CHECKPOINT)):
        raise UserError(f'student weights {path} is a directory without a {CHECKPOINT}; {what}')
    if not os.path.exists(path):
        raise UserError(f'student weights {path} do not exist; {what}')


def check_folder(flag, path):
    """A data folder may be missing (cifar.py downloads CIFAR into it), but not be a file."""
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        where = 'is a file' if existing == os.path.abspath(path) else f'lies inside {existing}, which is a file'
        raise UserError(f'--{flag} {path} {where}; pass the folder that holds the data')

"""Wide ResNets (and the CRD benchmark's networks, --arch) on CIFAR-10/100, alone or as students
of a trained teacher through activation-based attention transfer (AT) and knowledge
distillation (KD).

    python cifar.py --save logs/wrn16-2 --depth 16 --width 2
    python cifar.py --save logs/at16-1 --teacher_id wrn16-2 --beta 1e3
    python cifar.py --save logs/at8x4 --dataset CIFAR100 --arch resnet8x4 --beta 1e3 \\
        --teacher_params resnet32x4_vanilla/ckpt_epoch_240.pth --teacher_arch resnet32x4

Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
"""
if __name__ == '__main__':  # before the imports, which take seconds: Ctrl-C meanwhile ends in one line
    from engine.errors import stop_quietly_on_signals
    stop_quietly_on_signals()

import argparse
import os

import torch

import methods
from datasets.cifar import (
    CROP_PADDING,
    NORMALIZATION,
    NUM_CLASSES,
    Loader,
    check_cifar_release,
    check_cifar_tree,
    load_cifar,
)
from engine.checkpoint import CHECKPOINT, check_finite, copy_params_, load_checkpoint, network_params, read_log
from engine.cohort import check_options, resumed_options, start_runs
from engine.devices import usable_cores, uses_channels_last
from engine.errors import UserError
from engine.members import build_members, holding
from engine.options import CIFAR_RULES, add_common_arguments, check_cifar_networks, check_paths, given_flags
from engine.stopping import reports_user_errors
from engine.training import train
from models import zoo
from models.init import INITS, initialize, resolve
from resnet import resnet
from utils import DTYPES

TEACHER_FLAGS = ('teacher_id', 'teacher_params')  # either gives a run its teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='CIFAR training with attention transfer (Wide ResNets and the '
                                            "CRD benchmark's networks)")
    # Model options
    p.add_argument('--arch', default='wrn', type=str,
                   help=f'student network: wrn (a WRN-<depth>-<width>) or one of {", ".join(zoo.ARCHS)}')
    p.add_argument('--depth', default=16, type=int, help='WRN depth (--arch wrn only)')
    p.add_argument('--width', default=1, type=float, help='WRN width (--arch wrn only)')
    p.add_argument('--dataset', default='CIFAR10', type=str, choices=sorted(NUM_CLASSES))
    p.add_argument('--dataroot', default='.', type=str)
    p.add_argument('--dtype', default='float', type=str, choices=sorted(DTYPES))
    p.add_argument('--nthread', default=usable_cores(), type=int,
                   help='threads for decoding an image tree (default: the cores this process may use)')
    p.add_argument('--teacher_id', default='', type=str, help='teacher run, read from logs/<id>/')
    p.add_argument('--teacher_params', default='', type=str,
                   help="teacher from a RepDistiller checkpoint (e.g. resnet32x4_vanilla/ckpt_epoch_240.pth)")
    p.add_argument('--teacher_arch', default='', type=str, help='the network of --teacher_params')
    p.add_argument('--student_params', default='', type=str,
                   help='start the student (of --arch) from these weights: a RepDistiller or mdistiller checkpoint, '
                        "or a model.pt7 of this suite (its student); a cohort's members all start from them")
    p.add_argument('--init', default='auto', type=str,
                   help=f'how the student starts: {" or ".join(INITS)}; at: the AT paper\'s code (Kaiming-normal, '
                        'batch-norm scales U[0,1)), crd: RepDistiller\'s for each network family, auto: at for '
                        '--arch wrn, crd for the others')
    # Training options
    p.add_argument('--batch_size', default=128, type=int)
    p.add_argument('--lr', default=0.1, type=float)
    p.add_argument('--epochs', default=200, type=int, metavar='N', help='number of total epochs to run')
    p.add_argument('--weight_decay', default=0.0005, type=float)
    p.add_argument('--epoch_step', default='[60,120,160]', type=str, help='json list with epochs to drop lr on')
    p.add_argument('--lr_decay_ratio', default=0.2, type=float)
    p.add_argument('--resume', default='', type=str,
                   help="model.pt7 (or its folder) to continue from, a cohort's folder for a cohort; the options "
                        "not given are the checkpoint's, and --save its folder")
    p.add_argument('--randomcrop_pad', default=4, type=float)
    p.add_argument('--augment', default='on', type=str,
                   help='on: random crop (--randomcrop_pad) and horizontal flip of each training image; off: neither')
    p.add_argument('--crop_padding', default='reflect', type=str,
                   help=f'what the random crop pads with: {" or ".join(CROP_PADDING)} (zero: black, as RepDistiller)')
    p.add_argument('--normalization', default='cifar10', type=str,
                   help=f'mean/std of the input: {" or ".join(NORMALIZATION)} (cifar100: its own, as RepDistiller)')
    p.add_argument('--train_per_class', default=0, type=int, metavar='N',
                   help='train on the first N images of each class only (0: all), e.g. 500 for a first look')
    p.add_argument('--test_per_class', default=0, type=int, metavar='N',
                   help='test on the first N images of each class only (0: all)')
    add_common_arguments(p)
    opt = resumed_options(p.parse_args(argv), given_flags(p, argv))
    check_options(opt, CIFAR_RULES, TEACHER_FLAGS)
    check_cifar_networks(opt)
    return opt


def network(arch, depth, width, num_classes):
    """(f, params): a WRN-depth-width for arch 'wrn', else the zoo's network of that name."""
    return resnet(depth, width, num_classes) if arch == 'wrn' else zoo.network(arch, num_classes)


def student(opt, num_classes, start=None):
    """(f, params): the student of --arch, drawn from torch's generator as --init says, then,
    with `start` (the tensors of --student_params), holding those instead, in the file's dtype
    (the run casts them to its own once). The draw happens either way, so the methods' learned
    parts, drawn next, start the same with and without --student_params."""
    f, params = network(opt.arch, opt.depth, opt.width, num_classes)
    initialize(params, zoo.family(opt.arch), resolve(opt.init, opt.arch))
    return f, (params if start is None else holding(params, start))


def load_student_params(opt, num_classes):
    """The tensors of --student_params, checked against --arch, or None (none given, or a resume,
    whose checkpoint holds the student)."""
    if not opt.student_params or opt.resume:
        return None
    with torch.device('meta'):  # shapes only
        expected = network(opt.arch, opt.depth, opt.width, num_classes)[1]
    return zoo.load_network(opt.student_params, opt.arch, expected, '--student_params',
                            'pass other weights as --student_params')


def load_teacher(opt, num_classes):
    """(f_t, params_t) of --teacher_id or --teacher_params, or None: f_t(x, params, prefix)
    runs the teacher in inference mode (f_t(..., pooled=True) adds its pooled feature,
    preact=True also its pre-ReLU groups; f_t.bn_before_relu is the network's)."""
    if opt.teacher_params:
        f, params = zoo.network(opt.teacher_arch, num_classes)[0], \
            zoo.load_repdistiller(opt.teacher_params, opt.teacher_arch, num_classes)
    elif opt.teacher_id:
        f, params = load_teacher_run(opt.teacher_id, num_classes)
    else:
        return None
    return teacher_function(f), params


def teacher_function(f):
    """The network f(x, params, mode, base, **asked) as a teacher: always in inference mode."""
    def f_t(x, params, prefix, training=False, **asked):  # training: a method's reference runs it so
        return f(x, params, training, prefix, **asked)
    f_t.bn_before_relu = f.bn_before_relu  # OFD's margins are read off the teacher's BNs
    return f_t


def load_teacher_run(teacher_id, num_classes):
    """The network of run logs/<teacher_id>/: its first log line gives arch (a WRN when absent,
    as in logs written before --arch), depth and width."""
    run_dir = os.path.join('logs', teacher_id)
    if not os.path.isdir(run_dir):
        raise UserError(f'teacher {run_dir} does not exist; train the teacher with '
                        f'--save {run_dir} first or fix --teacher_id')
    info = read_log(run_dir)[0]
    if 'depth' not in info or 'width' not in info:
        raise UserError(f'{run_dir}/log.txt does not record depth and width; it is not a cifar.py run')
    if info.get('num_classes', num_classes) != num_classes:
        raise UserError(f'teacher {teacher_id} was trained on {info["num_classes"]} classes, this run '
                        f'has {num_classes}; pick a teacher trained on the same --dataset')
    arch = info.get('arch', 'wrn')
    if arch != 'wrn' and arch not in zoo.ARCHS:
        raise UserError(f'{run_dir}/log.txt records --arch {arch!r}, which this code does not know; '
                        f'fix --teacher_id')
    f, params = network(arch, info['depth'], info['width'], num_classes)
    path = os.path.join(run_dir, CHECKPOINT)
    # A student run's checkpoint holds both networks: its student can teach.
    loaded = network_params(load_checkpoint(path)['params'])
    check_finite(loaded, f'teacher {path}', 'retrain the teacher or pick another --teacher_id')
    copy_params_(params, loaded, path)
    for v in params.values():
        v.requires_grad_(False)
    return f, params


@reports_user_errors
def main(argv=None):
    opt = parse_args(argv)
    check_paths(opt)
    # Folder listings, or the release's batches read (not kept): a defect is refused before anything is written.
    if check_cifar_tree(opt.dataroot, opt.dataset) is None:
        check_cifar_release(opt.dataroot, opt.dataset)
    device, runs = start_runs(opt, CIFAR_RULES, TEACHER_FLAGS)
    num_classes = NUM_CLASSES[opt.dataset]

    teacher = load_teacher(opt, num_classes)  # before the data: a file that does not fit is refused at once
    start = load_student_params(opt, num_classes)
    train_images, train_labels = load_cifar(opt.dataroot, opt.dataset, True, opt.nthread, opt.train_per_class)
    test_images, test_labels = load_cifar(opt.dataroot, opt.dataset, False, opt.nthread, opt.test_per_class)
    layout = dict(dtype=DTYPES[opt.dtype], channels_last=uses_channels_last(opt), normalization=opt.normalization)
    train_loader = Loader(train_images.to(device), train_labels.to(device), opt.batch_size, train=True,
                          pad=int(opt.randomcrop_pad), padding=opt.crop_padding, seed=opt.data_seed,
                          augment=opt.augment == 'on', strong_view=any(methods.strong_view(run) for run in runs),
                          **layout)
    test_loader = Loader(test_images.to(device), test_labels.to(device), opt.batch_size, train=False,
                         **layout)

    members = build_members(runs, lambda: student(opt, num_classes, start), teacher,
                            image_size=32, device=device, channels_last=layout['channels_last'],
                            train_labels=train_loader.labels)

    train(opt, members, train_loader, test_loader, num_classes=num_classes, device=device,
          n_images=(len(train_images), len(test_images)))


if __name__ == '__main__':
    main()

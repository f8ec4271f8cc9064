"""ResNet-18/34 on ImageNet, alone or as students of a trained ResNet through attention
transfer on the outputs of the four groups (AT) and knowledge distillation (KD).

    python imagenet.py --imagenetpath ~/ILSVRC2012 --save logs/resnet18 --depth 18
    python imagenet.py --imagenetpath ~/ILSVRC2012 --save logs/at18-34 --depth 18 \\
        --teacher_params resnet34.pth --beta 1e3

Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, section 4.2.
"""
if __name__ == '__main__':  # before the imports, which take seconds: Ctrl-C meanwhile ends in one line
    from engine.errors import stop_quietly_on_signals
    stop_quietly_on_signals()

import argparse

from datasets.imagenet import ImageFolderLoader, check_image_folders
from engine.cohort import check_options, resumed_options, start_runs
from engine.devices import usable_cores, uses_channels_last
from engine.errors import UserError
from engine.members import build_members, holding
from engine.options import IMAGENET_RULES, add_common_arguments, check_paths, given_flags
from engine.stopping import reports_user_errors
from engine.training import train
from resnet import define_student, define_teacher, load_student_file
from utils import DTYPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='ResNet ImageNet training with attention transfer')
    # Model options
    p.add_argument('--imagenetpath', default='', type=str, help='folder holding train/<class>/ and val/<class>/')
    p.add_argument('--depth', default=18, type=int, help='student depth: 18 or 34')
    p.add_argument('--width', default=1, type=float)
    p.add_argument('--dtype', default='float', type=str, choices=sorted(DTYPES))
    p.add_argument('--nthread', default=usable_cores(), type=int,
                   help='image decoding worker processes (default: the cores this process may use)')
    p.add_argument('--teacher_params', default='', type=str,
                   help='teacher weights: torchvision resnet18/34 state dict, BN-folded export or model.pt7')
    p.add_argument('--student_params', default='', type=str,
                   help='start the student from these weights (of --depth and --width): a torchvision resnet18/34 '
                        "state dict or a model.pt7 of imagenet.py (its student); a cohort's members all start from "
                        'them')
    # Training options
    p.add_argument('--batch_size', default=256, type=int)
    p.add_argument('--lr', default=0.1, type=float)
    p.add_argument('--epochs', default=100, type=int, metavar='N', help='number of total epochs to run')
    p.add_argument('--weight_decay', default=1e-4, type=float)
    p.add_argument('--epoch_step', default='[30,60,90]', type=str, help='json list with epochs to drop lr on')
    p.add_argument('--lr_decay_ratio', default=0.1, type=float)
    p.add_argument('--resume', default='', type=str,
                   help="model.pt7 (or its folder) to continue from, a cohort's folder for a cohort; the options "
                        "not given are the checkpoint's, and --save its folder")
    add_common_arguments(p)
    opt = resumed_options(p.parse_args(argv), given_flags(p, argv))
    check_options(opt, IMAGENET_RULES, 'teacher_params')
    return opt


def load_teacher(path, num_classes):
    f, params = define_teacher(path)
    if params['fc.weight'].shape[0] != num_classes:
        raise UserError(f'teacher {path} predicts {params["fc.weight"].shape[0]} classes, the data has '
                        f'{num_classes}; pass a teacher trained on these classes')
    return f, params


def student(opt, num_classes, start=None):
    """(f, params): the student drawn from torch's generator, holding the tensors of
    --student_params (`start`) instead where given (members.holding)."""
    f, params = define_student(opt.depth, opt.width, num_classes)
    return f, (params if start is None else holding(params, start))


@reports_user_errors
def main(argv=None):
    opt = parse_args(argv)
    check_paths(opt)
    check_image_folders(opt.imagenetpath)  # lists folders only: nothing is decoded yet
    device, runs = start_runs(opt, IMAGENET_RULES, 'teacher_params')

    # The loader builds batches in the layout the step computes in, so none is converted twice.
    layout = dict(device=device, dtype=DTYPES[opt.dtype], channels_last=uses_channels_last(opt))
    train_loader = ImageFolderLoader(f'{opt.imagenetpath}/train', opt.batch_size, train=True,
                                     seed=opt.data_seed, nthread=opt.nthread, **layout)
    test_loader = ImageFolderLoader(f'{opt.imagenetpath}/val', opt.batch_size, train=False,
                                    nthread=opt.nthread, **layout)
    num_classes = len(train_loader.classes)

    teacher = load_teacher(opt.teacher_params, num_classes) if opt.teacher_params else None
    # A resumed student is its checkpoint's.
    start = (load_student_file(opt.student_params, opt.depth, opt.width, num_classes)
             if opt.student_params and not opt.resume else None)
    members = build_members(runs, lambda: student(opt, num_classes, start), teacher,
                            image_size=224, device=device, channels_last=layout['channels_last'],
                            train_labels=train_loader.labels)

    train(opt, members, train_loader, test_loader, num_classes=num_classes, device=device,
          topk=min(5, num_classes), n_images=(train_loader.order.n, test_loader.order.n))


if __name__ == '__main__':
    main()

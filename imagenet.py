"""ResNet-18/34 on ImageNet, alone or as students of a trained ResNet through attention
transfer on the outputs of the four groups (AT) and knowledge distillation (KD).

    python imagenet.py --imagenetpath ~/ILSVRC2012 --save logs/resnet18 --depth 18
    python imagenet.py --imagenetpath ~/ILSVRC2012 --save logs/at18-34 --depth 18 \\
        --teacher_params resnet34.pth --beta 1e3

Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, section 4.2.
"""
import argparse

import distributed
from errors import UserError, reports_user_errors
from imagenet_data import ImageFolderLoader
from resnet import IMAGENET_BLOCKS, define_student, define_teacher
from training import add_transfer_and_run_arguments, speed_settings, start_run, join_networks, train
from transfer import check_transfer_options
from utils import cast, print_tensor_dict, DTYPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='ResNet ImageNet training with attention transfer')
    # Model options
    p.add_argument('--imagenetpath', default='', type=str, help='folder holding train/<class>/ and val/<class>/')
    p.add_argument('--depth', default=18, type=int, help='student depth: 18 or 34')
    p.add_argument('--width', default=1, type=float)
    p.add_argument('--dtype', default='float', type=str, choices=sorted(DTYPES))
    p.add_argument('--nthread', default=4, type=int,
                   help='image decoding worker processes (about one per free CPU core on a GPU box)')
    p.add_argument('--teacher_params', default='', type=str,
                   help='teacher weights: torchvision resnet18/34 state dict, BN-folded export or model.pt7')
    # Training options
    p.add_argument('--batch_size', default=256, type=int)
    p.add_argument('--lr', default=0.1, type=float)
    p.add_argument('--epochs', default=100, type=int, metavar='N', help='number of total epochs to run')
    p.add_argument('--weight_decay', default=1e-4, type=float)
    p.add_argument('--epoch_step', default='[30,60,90]', type=str, help='json list with epochs to drop lr on')
    p.add_argument('--lr_decay_ratio', default=0.1, type=float)
    p.add_argument('--resume', default='', type=str, help='model.pt7 to continue from')
    add_transfer_and_run_arguments(p)
    opt = p.parse_args(argv)
    if not opt.imagenetpath:
        raise UserError('--imagenetpath is required: a folder with train/<class>/ and val/<class>/ images')
    if opt.depth not in IMAGENET_BLOCKS:
        raise UserError(f'--depth {opt.depth} is not an ImageNet ResNet here; use 18 or 34')
    if opt.width <= 0 or int(64 * opt.width) < 1:
        raise UserError(f'--width {opt.width} gives no channels; use a positive width such as 1')
    if opt.batch_size < 1 or opt.epochs < 1 or opt.nthread < 0:
        raise UserError('--batch_size and --epochs must be at least 1, --nthread at least 0')
    check_transfer_options(opt, bool(opt.teacher_params), '--teacher_params')
    return opt


def load_teacher(path, num_classes):
    f, params = define_teacher(path)
    if params['fc.weight'].shape[0] != num_classes:
        raise UserError(f'teacher {path} predicts {params["fc.weight"].shape[0]} classes, the data has '
                        f'{num_classes}; pass a teacher trained on these classes')
    return f, params


@reports_user_errors
def main(argv=None):
    opt = parse_args(argv)
    device = start_run(opt)

    # The loader builds batches in the layout the step computes in, so none is converted twice.
    layout = dict(device=device, dtype=DTYPES[opt.dtype],
                  channels_last=speed_settings(opt, device, opt.epochs).channels_last)
    train_loader = ImageFolderLoader(f'{opt.imagenetpath}/train', opt.batch_size, train=True,
                                     seed=opt.seed, nthread=opt.nthread, **layout)
    test_loader = ImageFolderLoader(f'{opt.imagenetpath}/val', opt.batch_size, train=False,
                                    nthread=opt.nthread, **layout)
    if test_loader.classes != train_loader.classes:
        raise UserError(f'{opt.imagenetpath}/train and {opt.imagenetpath}/val have different class '
                        f'folders; both need the same ones')
    num_classes = len(train_loader.classes)

    f_s, params_s = define_student(opt.depth, opt.width, num_classes)
    n_parameters = sum(p.numel() for p in params_s.values())
    teacher = load_teacher(opt.teacher_params, num_classes) if opt.teacher_params else None
    transfer, params = join_networks(opt, f_s, params_s, teacher, image_size=224)
    params = cast(params, opt.dtype, device)
    if distributed.is_main():
        print_tensor_dict(params, n_parameters)

    train(opt, transfer, params, train_loader, test_loader, n_parameters=n_parameters,
          num_classes=num_classes, device=device, topk=min(5, num_classes))


if __name__ == '__main__':
    main()

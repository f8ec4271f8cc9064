"""Wide ResNets on CIFAR-10/100, alone or as students of a trained teacher through
activation-based attention transfer (AT) and knowledge distillation (KD).

    python cifar.py --save logs/wrn16-2 --depth 16 --width 2
    python cifar.py --save logs/at16-1 --teacher_id wrn16-2 --beta 1e3

Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
"""
import argparse
import os

import distributed

from checkpoint import CHECKPOINT, read_log, load_checkpoint, copy_params_, network_params
from data import NUM_CLASSES, Loader, load_cifar
from errors import UserError, reports_user_errors
from resnet import resnet, wrn_block_count
from training import add_transfer_and_run_arguments, start_run, join_networks, train
from transfer import check_transfer_options
from utils import cast, print_tensor_dict, DTYPES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Wide ResNet training with attention transfer')
    # Model options
    p.add_argument('--depth', default=16, type=int)
    p.add_argument('--width', default=1, type=float)
    p.add_argument('--dataset', default='CIFAR10', type=str, choices=sorted(NUM_CLASSES))
    p.add_argument('--dataroot', default='.', type=str)
    p.add_argument('--dtype', default='float', type=str, choices=sorted(DTYPES))
    p.add_argument('--nthread', default=4, type=int, help='threads for decoding an image tree')
    p.add_argument('--teacher_id', default='', type=str, help='teacher run, read from logs/<id>/')
    # Training options
    p.add_argument('--batch_size', default=128, type=int)
    p.add_argument('--lr', default=0.1, type=float)
    p.add_argument('--epochs', default=200, type=int, metavar='N', help='number of total epochs to run')
    p.add_argument('--weight_decay', default=0.0005, type=float)
    p.add_argument('--epoch_step', default='[60,120,160]', type=str, help='json list with epochs to drop lr on')
    p.add_argument('--lr_decay_ratio', default=0.2, type=float)
    p.add_argument('--resume', default='', type=str, help='model.pt7 to continue from')
    p.add_argument('--randomcrop_pad', default=4, type=float)
    add_transfer_and_run_arguments(p)
    opt = p.parse_args(argv)
    if wrn_block_count(opt.depth) is None:
        raise UserError(f'--depth {opt.depth} is not 6n+4 (n >= 1); use e.g. 16, 22, 28 or 40')
    if opt.width <= 0 or int(16 * opt.width) < 1:
        raise UserError(f'--width {opt.width} gives no channels; use a positive width such as 1 or 2')
    if opt.batch_size < 1 or opt.epochs < 1:
        raise UserError('--batch_size and --epochs must be at least 1')
    check_transfer_options(opt, bool(opt.teacher_id), '--teacher_id')
    return opt


def load_teacher(teacher_id, num_classes):
    """The teacher of run logs/<teacher_id>/: its first log line gives depth and width."""
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
    f, params = resnet(info['depth'], info['width'], num_classes)
    path = os.path.join(run_dir, CHECKPOINT)
    # A student run's checkpoint holds both networks: its student can teach.
    copy_params_(params, network_params(load_checkpoint(path)['params']), path)
    for v in params.values():
        v.requires_grad_(False)
    return (lambda x, params, prefix: f(x, params, False, prefix)), params


@reports_user_errors
def main(argv=None):
    opt = parse_args(argv)
    device = start_run(opt)
    num_classes = NUM_CLASSES[opt.dataset]

    train_images, train_labels = load_cifar(opt.dataroot, opt.dataset, True, opt.nthread)
    test_images, test_labels = load_cifar(opt.dataroot, opt.dataset, False, opt.nthread)
    dtype = DTYPES[opt.dtype]
    train_loader = Loader(train_images.to(device), train_labels.to(device), opt.batch_size, train=True,
                          pad=int(opt.randomcrop_pad), seed=opt.seed, dtype=dtype)
    test_loader = Loader(test_images.to(device), test_labels.to(device), opt.batch_size, train=False,
                         dtype=dtype)

    f_s, params_s = resnet(opt.depth, opt.width, num_classes)
    n_parameters = sum(p.numel() for p in params_s.values())
    teacher = load_teacher(opt.teacher_id, num_classes) if opt.teacher_id else None
    transfer, params = join_networks(opt, f_s, params_s, teacher, image_size=32)
    params = cast(params, opt.dtype, device)
    if distributed.is_main():
        print_tensor_dict(params, n_parameters)

    train(opt, transfer, params, train_loader, test_loader, n_parameters=n_parameters,
          num_classes=num_classes, device=device)


if __name__ == '__main__':
    main()

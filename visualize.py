"""Attention maps of a trained run drawn over test images: one row per image, then one panel per
group of the student and, for a student run, its teacher's panel for the same group beside it.

    python visualize.py logs/at16-1 --n 8 --out attention.png

The map is the one attention transfer compares (losses.at: the channel mean of the squared
activations, or of their |.|^p for a run with --at_p p, L2-normalised per image), upsampled
bilinearly to the image and overlaid on it.
Student and teacher maps of one group and image share one colour scale (blue 0, red the larger
of the two peaks): after the L2 normalisation a more concentrated map has a higher peak, so the
colours compare how focused the two networks are. Works for runs of cifar.py and imagenet.py.
"""
import argparse
import os
import pickle

import torch
import torch.nn.functional as F

from datasets import cifar, imagenet
from engine.checkpoint import CHECKPOINT, copy_params_, load_checkpoint, network_params, read_log
from engine.errors import UserError
from engine.stopping import reports_user_errors
from methods.at import at
from models import zoo
from resnet import define_student, define_teacher, resnet
from utils import cast

FIGURE_TYPES = ('.png', '.pdf', '.svg')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Draw the attention maps of a run over test images')
    p.add_argument('run', metavar='RUN_DIR', help='run directory holding model.pt7 and log.txt')
    p.add_argument('--dataroot', default='', help="test data (default: the run's logged dataroot, "
                                                   'or imagenetpath for an ImageNet run)')
    p.add_argument('--n', default=8, type=int, help='number of test images, spread evenly over the set')
    p.add_argument('--out', required=True, metavar='FILE.png', help='figure to write (.png, .pdf, .svg)')
    p.add_argument('--nthread', default=4, type=int, help='threads for decoding an image tree')
    opt = p.parse_args(argv)
    if opt.n < 1:
        raise UserError(f'--n {opt.n}: draw at least one image')
    if os.path.splitext(opt.out)[1].lower() not in FIGURE_TYPES:
        raise UserError(f'--out {opt.out}: name a {", ".join(FIGURE_TYPES)} file')
    if not os.path.isdir(os.path.dirname(opt.out) or '.'):
        raise UserError(f'--out {opt.out}: folder {os.path.dirname(opt.out)} does not exist; '
                        f'create it first')
    return opt


def split_checkpoint(params):
    """(student, teacher) parameter dicts; teacher is empty for a run without one."""
    return network_params(params, 'student'), network_params(params, 'teacher')


def evenly_spread(total, n, what):
    if n > total:
        raise UserError(f'--n {n} is more than the {total} {what}; pass a smaller --n')
    return torch.linspace(0, total - 1, n).round().long()


def normalise(images, mean, std):
    """uint8 images -> the float input the networks were trained on (statistics on the 0..255 scale)."""
    return (images.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def top1(acc):
    """The original ImageNet code logged [top-1, top-5] accuracy."""
    return acc[0] if isinstance(acc, list) else acc


# ----------------------------------------------------------------------------------------------
# CIFAR runs (cifar.py): Wide ResNets whose depth and width are read from the tensor shapes, so
# neither the teacher's run directory nor its log is needed; the CRD benchmark's networks
# (--arch) by the names the logs record.

def wrn_from_params(params, source):
    """A CIFAR WRN in eval mode holding `params`: (name, x -> (logits, groups))."""
    try:
        blocks = sum(1 for k in params if k.startswith('group0.block') and k.endswith('.conv0'))
        width = params['group0.block0.conv0'].shape[0] / 16
        num_classes = params['fc.weight'].shape[0]
    except KeyError as e:
        raise UserError(f'{source} holds no CIFAR Wide ResNet (no tensor {e.args[0]})') from None
    depth = 6 * blocks + 4
    f, own = resnet(depth, width, num_classes)
    copy_params_(own, params, source)
    return f'WRN-{depth}-{width:g}', lambda x: f(x, own, False)


def zoo_from_params(arch, params, source):
    """A network of the CRD benchmark (cifar.py --arch) in eval mode holding `params`."""
    if 'fc.weight' not in params:
        raise UserError(f'{source} holds no {arch} (no tensor fc.weight)')
    f, own = zoo.network(arch, params['fc.weight'].shape[0])
    copy_params_(own, params, source)
    return arch, lambda x: f(x, own, False)


def teacher_arch(record):
    """The teacher's network: logged with a RepDistiller teacher, else in the log of the teacher's
    run (read relative to the working directory, as cifar.py reads it), else a WRN."""
    if record.get('teacher_arch'):
        return record['teacher_arch']
    run_dir = os.path.join('logs', record.get('teacher_id') or '')
    if record.get('teacher_id') and os.path.isfile(os.path.join(run_dir, 'log.txt')):
        return read_log(run_dir)[0].get('arch', 'wrn')
    return 'wrn'


def cifar_networks(params, source, record):
    student, teacher = split_checkpoint(params)
    nets = []
    for arch, tensors, name in ((record.get('arch', 'wrn'), student, source),
                                (teacher_arch(record), teacher, source + ' (teacher)')):
        if tensors:
            nets.append(wrn_from_params(tensors, name) if arch == 'wrn' else zoo_from_params(arch, tensors, name))
    return nets


def cifar_class_names(dataroot, dataset):
    """Folder names of an image tree, or the label names in the python release's meta file."""
    tree = os.path.join(dataroot, 'test')
    if os.path.isdir(tree):
        return sorted(d for d in os.listdir(tree) if os.path.isdir(os.path.join(tree, d)))
    meta, key = {'CIFAR10': ('batches.meta', 'label_names'), 'CIFAR100': ('meta', 'fine_label_names')}[dataset]
    try:
        with open(os.path.join(dataroot, cifar.RELEASE[dataset][0], meta), 'rb') as f:
            return list(cifar.ArrayUnpickler(f, encoding='latin1').load()[key])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError):
        return None  # labels are then shown as numbers


def cifar_images(dataroot, dataset, n, threads, normalization='cifar10'):
    """(uint8 images N x 3 x 32 x 32, normalised float images, labels, class names)."""
    images, labels = cifar.load_cifar(dataroot, dataset, False, threads)
    pick = evenly_spread(len(images), n, 'test images')
    images, labels = images[pick], labels[pick]
    return (images, normalise(images, *cifar.NORMALIZATION[normalization]), labels,
            cifar_class_names(dataroot, dataset))


# ----------------------------------------------------------------------------------------------
# ImageNet runs (imagenet.py): ResNet-18/34 student and a teacher read from its --teacher_params.

def imagenet_networks(params, record, source):
    student, teacher = split_checkpoint(params)
    if 'fc.weight' not in student:
        raise UserError(f'{source} holds no ImageNet ResNet (no tensor fc.weight)')
    f_s, own_s = define_student(record['depth'], record['width'], student['fc.weight'].shape[0])
    copy_params_(own_s, student, source)
    width = '' if record['width'] == 1 else f' x{record["width"]:g}'
    nets = [(f'ResNet-{record["depth"]}{width}', lambda x: f_s(x, own_s, False))]
    path = record.get('teacher_params', '')
    if path:
        # The checkpoint holds the teacher's tensors, but only its file tells its architecture.
        f_t, own_t = define_teacher(path)
        if teacher:
            copy_params_(own_t, teacher, source + ' (teacher)')
        nets.append((os.path.splitext(os.path.basename(path))[0], lambda x: f_t(x, own_t)))
    return nets


def imagenet_images(root, n):
    """Validation images as evaluation sees them (resize 256, centre crop 224):
    (uint8 N x 3 x 224 x 224, normalised float images, labels, class names)."""
    paths, labels, classes = imagenet.list_image_folder(os.path.join(root, 'val'))
    files = imagenet.ImageFiles(paths, labels, train=False)
    pick = evenly_spread(len(files), n, f'images in {root}/val').tolist()
    images = torch.stack([files[(i, 0)][0] for i in pick]).permute(0, 3, 1, 2)
    return (images, normalise(images, imagenet.MEAN, imagenet.STD),
            torch.tensor([labels[i] for i in pick]), classes)


# ----------------------------------------------------------------------------------------------
# Shared by both: maps per group, and the grid.

def attention_columns(outputs, size, p=2):
    """One (title, maps N x H x W in [0, 1]) column per group and network, the networks of a
    group side by side and scaled by their common maximum per image; p is the run's --at_p."""
    columns = []
    for g in range(min(len(groups) for _, (_, groups) in outputs)):
        maps = []
        for role, (_, groups) in outputs:
            a = groups[g].float()
            q = at(a, p).view(a.shape[0], 1, *a.shape[2:])
            up = F.interpolate(q, size=size, mode='bilinear', align_corners=False)[:, 0]
            maps.append((f'{role}\ngroup {g}, {a.shape[2]}x{a.shape[3]}', up))
        scale = torch.stack([m for _, m in maps]).amax(dim=(0, 2, 3)).clamp_min(1e-12).view(-1, 1, 1)
        columns += [(title, m / scale) for title, m in maps]
    return columns


def row_labels(labels, outputs, class_names):
    """'true class' and each network's prediction; red when the first network (the student) is wrong."""
    def name(i):
        return class_names[i] if class_names and i < len(class_names) else str(i)
    rows = []
    for i, label in enumerate(labels.tolist()):
        predictions = [logits[i].argmax().item() for _, (logits, _) in outputs]
        text = f'true: {name(label)}' + ''.join(f'\n{role}: {name(p)}'
                                                for (role, _), p in zip(outputs, predictions))
        rows.append((text, 'black' if predictions[0] == label else 'red'))
    return rows


def draw_grid(images, columns, rows, title, out):
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt

    n, width = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, width, figsize=(1.25 * width + 0.6, 1.25 * n + 0.7), squeeze=False)
    for i in range(n):
        picture = images[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(picture)
        axes[i, 0].set_ylabel(rows[i][0], fontsize=7, color=rows[i][1], rotation=0, ha='right', va='center')
        for j, (_, maps) in enumerate(columns, 1):
            axes[i, j].imshow(picture)
            axes[i, j].imshow(maps[i].numpy(), cmap='jet', alpha=0.5, vmin=0, vmax=1)
    axes[0, 0].set_title('input', fontsize=8)
    for j, (name, _) in enumerate(columns, 1):
        axes[0, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UserError(f'cannot write {out} ({e})') from None
    plt.close(fig)


@reports_user_errors
def main(argv=None):
    opt = parse_args(argv)
    record = read_log(opt.run)[-1]
    source = os.path.join(opt.run, CHECKPOINT)
    params = cast(load_checkpoint(source)['params'], 'float')

    if 'imagenetpath' in record:
        nets = imagenet_networks(params, record, source)
        images, x, labels, class_names = imagenet_images(opt.dataroot or record['imagenetpath'], opt.n)
    else:
        nets = cifar_networks(params, source, record)
        dataroot = opt.dataroot or record.get('dataroot', record.get('data_root', '.'))
        images, x, labels, class_names = cifar_images(dataroot, record.get('dataset', 'CIFAR10'),
                                                      opt.n, opt.nthread, record.get('normalization', 'cifar10'))

    roles = ['student', 'teacher'] if len(nets) == 2 else ['network']
    with torch.no_grad():
        outputs = [(role, f(x)) for role, (_, f) in zip(roles, nets)]
    columns = attention_columns(outputs, images.shape[2:], record.get('at_p', 2))
    title = (f'{opt.run}, epoch {record["epoch"]}, test error {100 - top1(record["test_acc"]):.2f}%\n'
             + ', '.join(f'{role} {name}' for role, (name, _) in zip(roles, nets)))
    draw_grid(images, columns, row_labels(labels, outputs, class_names), title, opt.out)
    print(f'attention maps of {opt.n} test images written to {opt.out}')


if __name__ == '__main__':
    main()

"""The CIFAR-100 benchmark of the CRD paper through cifar.py: every network of the zoo trains,
RepDistiller's checkpoints teach (alone and in a cohort), AT compares groups of different sizes
by pooling, RepDistiller's crop and normalisation, and bad input is refused in one line.

The data is a tiny CIFAR-100 python release made here (16 training and 8 test images, one batch
each): these runs check that everything fits together, not that anything learns."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cifar
import summarize
import visualize
from conftest import check_png, run_cli, run_in_process
from datasets.cifar import Loader, random_crop_flip
from methods.at import at_loss, at_loss_paper
from models import zoo
from repdistiller_reference import REFERENCES
from test_cifar import checkpoint, expect_user_error, log_lines, ok

PROTOCOL = ['--dataset', 'CIFAR100', '--batch_size', 16, '--epochs', 1, '--nthread', 1, '--crop_padding', 'zero',
            '--normalization', 'cifar100']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Small batches of small images are too little work to share between threads on a busy
    machine (see test_zoo.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cifar100_release(root, n_train=16, n_test=8):
    """root/cifar-100-python/{train,test} in the layout of the official python release."""
    d = os.path.join(root, 'cifar-100-python')
    os.makedirs(d)
    rng = np.random.default_rng(0)
    for name, n in (('train', n_train), ('test', n_test)):
        with open(os.path.join(d, name), 'wb') as f:
            pickle.dump({'data': rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                         'fine_labels': (np.arange(n) * 7 % 100).tolist()}, f, protocol=2)
    return root


def save_published(arch, path, num_classes=100, seed=0):
    """A checkpoint as RepDistiller's train_teacher.py writes it."""
    torch.manual_seed(seed)
    torch.save({'epoch': 240, 'model': REFERENCES[arch](num_classes).state_dict(), 'accuracy': 70.0}, path)
    return str(path)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp('crd')
    make_cifar100_release(str(d / 'data'))
    save_published('resnet8', d / 'resnet8.pth')
    return d


def tree(directory):
    """Every path under directory with each file's size and modification time: what a refused
    run must leave as it found it (hashing the other tests' checkpoints would take longer)."""
    seen = {}
    for folder, _, files in os.walk(directory):
        seen[folder] = None
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            seen[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return seen


@pytest.mark.parametrize('arch', zoo.ARCHS)
def test_every_network_trains_an_epoch(arch, workdir):
    ok(run_in_process(cifar.main, *PROTOCOL, '--arch', arch, '--seed', 1, '--dataroot', 'data',
                      '--save', f'logs/{arch}', cwd=workdir))
    line, = log_lines(workdir / 'logs' / arch)
    assert line['arch'] == arch and line['num_classes'] == 100 and np.isfinite(line['train_loss'])
    assert line['n_parameters'] == sum(v.numel() for v in zoo.network(arch, 100)[1].values())
    assert line['crop_padding'] == 'zero' and line['normalization'] == 'cifar100'


def test_a_run_of_the_zoo_teaches_by_its_logged_arch(workdir):
    ok(run_in_process(cifar.main, *PROTOCOL, '--arch', 'resnet14', '--seed', 2, '--dataroot', 'data',
                      '--save', 'logs/teacher_resnet14', cwd=workdir))
    ok(run_in_process(cifar.main, *PROTOCOL, '--arch', 'wrn_16_1', '--teacher_id', 'teacher_resnet14',
                      '--beta', 1e3, '--dataroot', 'data', '--save', 'logs/from_resnet14', cwd=workdir))
    teacher = checkpoint(workdir / 'logs/teacher_resnet14')['params']
    student = checkpoint(workdir / 'logs/from_resnet14')['params']
    assert all(torch.equal(student['teacher.' + k], v) for k, v in teacher.items())
    assert len(log_lines(workdir / 'logs/from_resnet14')[0]['at_losses']) == 3


def test_student_of_a_published_teacher(workdir):
    """resnet8x4 from RepDistiller's resnet32x4: the teacher is the checkpoint's, untouched."""
    path = save_published('resnet32x4', workdir / 'resnet32x4.pth')
    ok(run_in_process(cifar.main, *PROTOCOL, '--arch', 'resnet8x4', '--teacher_params', path,
                      '--teacher_arch', 'resnet32x4', '--beta', 1e3, '--alpha', 0.9, '--dataroot', 'data',
                      '--save', 'logs/resnet8x4_from_resnet32x4', cwd=workdir))
    params = checkpoint(workdir / 'logs/resnet8x4_from_resnet32x4')['params']
    published = zoo.load_repdistiller(path, 'resnet32x4', 100)
    assert all(torch.equal(params['teacher.' + k], v) for k, v in published.items())
    line, = log_lines(workdir / 'logs/resnet8x4_from_resnet32x4')
    assert line['teacher_arch'] == 'resnet32x4' and len(line['at_losses']) == 3
    assert all(mean > 0 for mean, _ in line['at_losses']) and line['distillation_loss'][0] > 0
    assert summarize.student_name(line) == 'resnet8x4'
    assert summarize.teacher_name(line) == 'resnet32x4 (RepDistiller)'
    # its attention maps beside the teacher's, both networks built from the logged names
    ok(run_in_process(visualize.main, 'logs/resnet8x4_from_resnet32x4', '--n', 2, '--out', 'maps.png', cwd=workdir))
    check_png(workdir / 'maps.png', 400, 150)


def test_a_cohort_learns_from_a_published_teacher_of_larger_maps(workdir):
    """ShuffleV2's groups end at 16, 8, 4 pixels, resnet8's at 32, 16, 8: AT pools the teacher's.
    The four columns of crd_table.sh, one cohort."""
    members = [{'name': 'student', 'seed': 1}, {'name': 'kd', 'seed': 2, 'alpha': 0.9},
               {'name': 'at', 'seed': 3, 'beta': 1e3}, {'name': 'at_kd', 'seed': 4, 'alpha': 0.9, 'beta': 1e3}]
    ok(run_in_process(cifar.main, *PROTOCOL, '--arch', 'ShuffleV2', '--teacher_params', 'resnet8.pth',
                      '--teacher_arch', 'resnet8', '--dataroot', 'data', '--save', 'logs/shufflev2_row',
                      '--cohort', json.dumps(members), cwd=workdir))
    for m in members:
        line, = log_lines(workdir / 'logs/shufflev2_row' / m['name'])
        assert line['teacher_params'] == 'resnet8.pth' and line['seed'] == m['seed']
        assert len(line['at_losses']) == 3 and all(np.isfinite(mean) and mean > 0 for mean, _ in line['at_losses'])
        assert line['loss_weights'] == {'distillation': 1.0, 'at': m.get('beta', 0)}


def test_at_of_groups_of_different_sizes_pools_the_larger_first():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)
    pooled = s.view(2, 3, 2, 2, 2, 2).mean((3, 5))  # each 2x2 block of s averaged: s at t's size

    def attention(x):  # mean over channels of x^2, flattened, unit length per sample
        q = x.pow(2).mean(1).flatten(1)
        return q / q.pow(2).sum(1, keepdim=True).sqrt()

    difference = attention(pooled) - attention(t)
    expected = difference.pow(2).sum() / difference.numel()
    torch.testing.assert_close(at_loss(s, t), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(at_loss(t, s), expected, rtol=1e-12, atol=0)  # whichever is larger
    torch.testing.assert_close(at_loss_paper(s, t), difference.pow(2).sum(1).sqrt().mean(), rtol=1e-12, atol=0)
    assert at_loss(s[:, :, :2, :2], t).item() != expected.item()  # equal sizes are not pooled


def test_zero_padded_crops_are_crops_of_the_black_padded_image():
    torch.manual_seed(0)
    x = torch.randint(1, 256, (1, 3, 8, 8), dtype=torch.uint8)  # no black pixel of its own
    padded = F.pad(x[0], (2,) * 4)
    crops = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    crops += [c.flip(2) for c in crops]
    out = random_crop_flip(x.expand(600, -1, -1, -1), 2, torch.Generator().manual_seed(1), padding='zero')
    seen = set()
    for image in out:
        match = [n for n, c in enumerate(crops) if torch.equal(c, image)]
        assert match, 'not a crop of the zero-padded image'
        seen.add(match[0])
    assert len(seen) == 50  # every offset, mirrored and not
    reflect = random_crop_flip(x.expand(600, -1, -1, -1), 2, torch.Generator().manual_seed(1))
    assert (reflect > 0).all()  # reflect padding never shows black


def test_cifar100_normalization_uses_its_own_statistics():
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    x, _, _, _ = next(iter(Loader(images, torch.zeros(2, dtype=torch.long), 2, train=False, normalization='cifar100')))
    mean, std = torch.tensor([0.5071, 0.4867, 0.4408]), torch.tensor([0.2675, 0.2565, 0.2761])
    torch.testing.assert_close(x[0, :, 0, 0], (128 / 255 - mean) / std)


def test_bad_networks_and_teachers_are_one_line_errors_that_write_nothing(workdir):
    save_published('resnet8', workdir / 'resnet8_cifar10.pth', num_classes=10)
    published = ['--teacher_params', 'resnet8.pth', '--teacher_arch', 'resnet8']
    cases = [
        (['--arch', 'resnet9'], ["--arch 'resnet9' is not a network here", 'resnet8x4']),
        (['--teacher_arch', 'resnet8'], ['--teacher_arch resnet8 names the network of a --teacher_params file']),
        (['--teacher_params', 'resnet8.pth'], ['--teacher_params resnet8.pth needs --teacher_arch']),
        ([*published, '--teacher_id', 'teacher_resnet14'], ['--teacher_id and --teacher_params both name']),
        (['--teacher_params', 'resnet8.pth', '--teacher_arch', 'resnet20'],
         ['resnet8.pth is not a RepDistiller resnet20 for 100 classes: it lacks layer1.1.conv1.weight']),
        (['--teacher_params', 'resnet8_cifar10.pth', '--teacher_arch', 'resnet8'],
         ['fc.weight has shape (10, 64), expected (100, 64)']),
        (['--teacher_params', 'nothing.pth', '--teacher_arch', 'resnet8'],
         ['teacher weights nothing.pth do not exist']),
        (['--arch', 'vgg8', *published, '--beta', 1e3], ['the student has 4 groups and the teacher 3']),
        (['--arch', 'ShuffleV2', *published, '--fitnet_beta', 1], ['--fitnet_beta compares outputs of group 1',
                                                                   '(8, 8) in the student and (16, 16)']),
        (['--arch', 'vgg8', '--width', 2], ['--width sizes the Wide ResNet of --arch wrn']),
    ]
    before = tree(workdir)
    for n, (extra, phrases) in enumerate(cases):
        args = [*PROTOCOL, '--dataroot', 'data', '--save', 'logs/refused', *extra]
        # the first through the command line, the rest in this process (no imports to pay for)
        run = run_cli('cifar.py', *args, cwd=workdir) if n == 0 else run_in_process(cifar.main, *args, cwd=workdir)
        expect_user_error(run, *phrases)
        assert tree(workdir) == before, extra

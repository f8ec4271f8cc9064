import os

import pytest
import torch
import torch.nn.functional as F

from conftest import make_image_tree
from datasets.cifar import MEAN, STD, Loader, load_cifar, random_crop_flip, reflect
from engine.errors import UserError


def candidates(image, pad):
    """All crops of the reflect-padded image, and their mirror images."""
    p = F.pad(image[None].float(), (pad,) * 4, mode='reflect')[0]
    H, W = image.shape[1:]
    out = []
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = p[:, oy:oy + H, ox:ox + W]
            out += [(oy, ox, False, crop), (oy, ox, True, crop.flip(2))]
    return out


def test_reflect_matches_reflect_padding():
    idx = torch.arange(-4, 36)
    padded = F.pad(torch.arange(32.).view(1, 1, 32), (4, 4), mode='reflect').view(-1)
    assert reflect(idx, 32).tolist() == padded[idx + 4].long().tolist()


def test_random_crop_flip_draws_every_crop_and_flip_uniformly():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    cands = candidates(x[0], 4)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x.expand(4000, -1, -1, -1), 4, g).float()
    seen = torch.zeros(len(cands))
    for img in out:
        match = [i for i, c in enumerate(cands) if torch.equal(c[3], img)]
        assert match, 'output is not a reflect-padded crop of the input'
        seen[match[0]] += 1
    flips = sum(seen[i] for i, c in enumerate(cands) if c[2])
    assert 0.45 < flips / 4000 < 0.55
    per_offset = seen.view(81, 2).sum(1)
    assert per_offset.min() > 20 and per_offset.max() < 80  # 81 offsets, ~49 draws each


def test_loader_covers_each_image_once_per_epoch_and_depends_only_on_the_epoch():
    images = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 32, 32).to(torch.uint8)
    labels = torch.arange(10)
    loader = Loader(images, labels, batch_size=4, train=True, pad=0, seed=7)
    assert len(loader) == 3

    def epoch(e):
        loader.set_epoch(e)
        return torch.cat([y for _, y, _, _ in loader]).tolist()

    e1, e2 = epoch(1), epoch(2)
    assert sorted(e1) == list(range(10)) and sorted(e2) == list(range(10))
    assert e1 != e2 and epoch(1) == e1
    x, y, share, index = next(iter(loader))
    assert share == 1.0 and torch.equal(index, y)  # each image's label is its position here
    expected = (y.view(-1, 1).float() - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, :, 5, 5], expected)


def test_test_loader_keeps_order_without_augmentation():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    loader = Loader(images, torch.arange(7), batch_size=3, train=False)
    xs = torch.cat([x for x, _, _, _ in loader])
    assert torch.cat([index for _, _, _, index in loader]).tolist() == list(range(7))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(xs, (images.float() - mean) / std)


def test_both_layouts_load_the_same_images(image_tree, python_release):
    a, la = load_cifar(image_tree, 'CIFAR10', True)
    b, lb = load_cifar(python_release, 'CIFAR10', True)
    assert a.shape == b.shape == (100, 3, 32, 32) and a.dtype == torch.uint8
    # the tree sorts by class folder, the release keeps file order: compare as sets per class
    for c in range(10):
        sa = sorted(x.flatten().tolist() for x in a[la == c])
        sb = sorted(x.flatten().tolist() for x in b[lb == c])
        assert sa == sb
    t, lt = load_cifar(python_release, 'CIFAR10', False)
    assert t.shape == (40, 3, 32, 32) and lt.tolist() == [i % 10 for i in range(40)]


def test_jpeg_tree_and_class_count_check(tmp_path):
    root = make_image_tree(str(tmp_path), n_train=20, n_test=10, ext='jpg')
    images, labels = load_cifar(root, 'CIFAR10', False)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == list(range(10))
    with pytest.raises(UserError, match='has 10 class folders but --dataset CIFAR100'):
        load_cifar(root, 'CIFAR100', True)


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match='not found in .*looked for an image tree'):
        load_cifar(str(tmp_path / 'nowhere'), 'CIFAR10', True)


def test_tampered_release_is_refused(tmp_path):
    d = tmp_path / 'cifar-10-batches-py'
    d.mkdir()
    import pickle
    with open(d / 'data_batch_1', 'wb') as f:
        pickle.dump({'data': os.system}, f)
    with pytest.raises(UserError, match='cannot read'):
        load_cifar(str(tmp_path), 'CIFAR10', True)


@pytest.mark.parametrize('channels_last', [False, True])
def test_batches_come_in_the_layout_the_step_computes_in(channels_last):
    """The crop's gather leaves a batch NHWC in memory; the reference path must get NCHW."""
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    for train, pad in ((True, 4), (True, 0), (False, 0)):
        loader = Loader(images, torch.arange(10), batch_size=4, train=train, pad=pad, channels_last=channels_last)
        x, _, _, _ = next(iter(loader))
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=layout), (train, pad)


def test_images_in_sub_folders_of_a_class_count_as_torchvision_imagefolder_counts_them(tmp_path):
    """ImageFolder takes a class's images at any depth, links followed; leaving them out would
    train on part of the data without a word."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from datasets.cifar import list_image_tree
    root = make_image_tree(str(tmp_path / 'data'), n_train=20, n_test=10)
    for sub in ('more', 'more/deeper', 'a b', 'z'):
        os.makedirs(tmp_path / 'data/train/class3' / sub)
        Image.new('RGB', (32, 32), (1, 2, 3)).save(tmp_path / 'data/train/class3' / sub / '0.png')
    os.makedirs(tmp_path / 'elsewhere')
    Image.new('RGB', (32, 32), (4, 5, 6)).save(tmp_path / 'elsewhere/linked.png')
    os.symlink(tmp_path / 'elsewhere', tmp_path / 'data/train/class7/link')
    files, labels, classes = list_image_tree(os.path.join(root, 'train'))
    assert list(zip(files, labels)) == ImageFolder(os.path.join(root, 'train')).samples
    assert len(files) == 20 + 4 + 1 and files.count(os.path.join(root, 'train/class7/link/linked.png')) == 1
    images, _ = load_cifar(root, 'CIFAR10', True)
    assert len(images) == 25


def test_a_link_to_a_folder_above_is_refused_rather_than_listed_at_every_level(tmp_path):
    from datasets.cifar import list_image_tree
    root = make_image_tree(str(tmp_path), n_train=10, n_test=10)
    os.symlink(tmp_path / 'train/class2', tmp_path / 'train/class2/loop')
    with pytest.raises(UserError, match='class2/loop links to .*class2, a folder above it'):
        list_image_tree(os.path.join(root, 'train'))


def write_batch(path, **batch):
    import pickle
    with open(path, 'wb') as f:
        pickle.dump(batch, f, protocol=2)


@pytest.mark.parametrize('damage, message', [
    (lambda b: {**b, 'data': b['data'][:, :3000]}, 'uint8 rows of shape (3000,), not uint8 rows of 3,072 bytes'),
    (lambda b: {**b, 'data': b['data'].astype('float32')}, 'float32 rows'),
    (lambda b: {**b, 'labels': b['labels'][:-1]}, 'holds 20 images but 19 labels'),
    (lambda b: {**b, 'labels': [10] + b['labels'][1:]}, 'labels outside 0..9'),
    (lambda b: {'data': b['data']}, 'no "data" and "labels" entries'),
])
def test_a_damaged_release_batch_is_refused_naming_the_file(python_release, tmp_path, damage, message):
    import pickle
    import shutil
    shutil.copytree(python_release, tmp_path / 'r')
    path = tmp_path / 'r/cifar-10-batches-py/data_batch_3'
    with open(path, 'rb') as f:
        batch = pickle.load(f)
    write_batch(path, **damage(batch))
    from datasets.cifar import check_cifar_release
    with pytest.raises(UserError, match='data_batch_3') as e:
        check_cifar_release(str(tmp_path / 'r'), 'CIFAR10')
    assert message in str(e.value) and 'unpack the CIFAR10 python release there again' in str(e.value)
    with pytest.raises(UserError, match='data_batch_3'):
        load_cifar(str(tmp_path / 'r'), 'CIFAR10', True)


def test_cifar_py_refuses_a_damaged_release_before_anything_is_written(python_release, tmp_path):
    """A label list one short trained until the index ran off the end, after the run folder
    was made."""
    import pickle
    import shutil

    import cifar
    from conftest import run_in_process
    shutil.copytree(python_release, tmp_path / 'r')
    path = tmp_path / 'r/cifar-10-batches-py/test_batch'
    with open(path, 'rb') as f:
        batch = pickle.load(f)
    write_batch(path, data=batch['data'], labels=batch['labels'][:-1])
    result = run_in_process(cifar.main, '--depth', 10, '--epochs', 1, '--dataroot', tmp_path / 'r', '--nthread', 1,
                            '--save', 'logs/r', cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'test_batch holds 40 images but 39 labels' in lines[0], result.stderr
    assert not os.path.exists(tmp_path / 'logs')


@pytest.mark.parametrize('limit', [600, 100], ids=['warning', 'error'])
def test_decompression_bombs_are_refused_naming_the_file(tmp_path, monkeypatch, limit):
    """Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; 32x32 is 1,024 pixels."""
    from PIL import Image

    from datasets.cifar import decode_images
    make_image_tree(str(tmp_path), n_train=10, n_test=10)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', limit)
    files = sorted(str(p) for p in (tmp_path / 'test').rglob('*.png'))
    with pytest.raises(UserError, match=f'{files[0]} is refused as a decompression bomb'):
        decode_images(files, threads=2)

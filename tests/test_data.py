import os

import pytest
import torch
import torch.nn.functional as F

from data import Loader, load_cifar, random_crop_flip, reflect, MEAN, STD
from errors import UserError
from conftest import make_image_tree


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
        return torch.cat([y for _, y, _ in loader]).tolist()

    e1, e2 = epoch(1), epoch(2)
    assert sorted(e1) == list(range(10)) and sorted(e2) == list(range(10))
    assert e1 != e2 and epoch(1) == e1
    x, y, share = next(iter(loader))
    assert share == 1.0
    expected = (y.view(-1, 1).float() - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, :, 5, 5], expected)


def test_test_loader_keeps_order_without_augmentation():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    loader = Loader(images, torch.arange(7), batch_size=3, train=False)
    xs = torch.cat([x for x, _, _ in loader])
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
        x, _, _ = next(iter(loader))
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert x.is_contiguous(memory_format=layout), (train, pad)

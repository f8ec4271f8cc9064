"""CIFAR data held in memory as uint8 tensors, augmented in batches.

The whole of CIFAR is 180 MB as uint8, so it is decoded once and kept as one tensor (on the
GPU when training there). Each batch is cropped, flipped and normalised with a few tensor ops
instead of per-image PIL transforms in worker processes.
"""
import contextlib
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from datasets.strong_view import strong_view
from engine import distributed
from engine.errors import UserError

# Per-channel statistics of the CIFAR-10 training set on the 0..255 scale, as in the reference
# code; used for CIFAR-100 too unless --normalization cifar100 asks for CIFAR-100's own, which
# the CRD benchmark (RepDistiller) uses, given there on the 0..1 scale.
MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
NORMALIZATION = {'cifar10': (MEAN, STD),
                 'cifar100': (tuple(255 * m for m in (0.5071, 0.4867, 0.4408)),
                              tuple(255 * s for s in (0.2675, 0.2565, 0.2761)))}
CROP_PADDING = ('reflect', 'zero')
NUM_CLASSES = {'CIFAR10': 10, 'CIFAR100': 100}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm')


def load_cifar(dataroot, dataset, train, threads=4, per_class=0):
    """Returns (images uint8 N x 3 x 32 x 32, labels int64 N) for the train or test split; with
    `per_class`, only the first that many images of each class (all of a class that has fewer).

    `dataroot` holds either an image tree (train/<class>/*, test/<class>/*, class folders
    sorted in label order) or the python release of `dataset` (cifar-10-batches-py/ or
    cifar-100-python/, which torchvision downloads there when it is missing)."""
    tree = check_cifar_tree(dataroot, dataset)
    if tree:
        files, labels = tree['train' if train else 'test']
        keep = first_per_class(labels, per_class)  # before decoding: a subset decodes only its images
        return decode_images([files[i] for i in keep], threads), torch.tensor(labels)[keep]
    images, labels = load_torchvision_release(dataroot, dataset, train)
    keep = first_per_class(labels.tolist(), per_class)
    return images[keep], labels[keep]


def first_per_class(labels, n):
    """The positions of the first `n` images of each label, in their order (every one for n = 0)."""
    if not n:
        return list(range(len(labels)))
    seen = {}
    keep = []
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= n:
            keep.append(i)
    return keep


def check_cifar_tree(dataroot, dataset):
    """{split: (files, labels)} of the image tree under dataroot, or None when it holds none.
    Refuses a tree that would train on wrong labels, from folder listings alone (no image is
    opened): class folders that differ between the splits, a number of them other than
    `dataset` has, or one without images."""
    if not all(os.path.isdir(os.path.join(dataroot, split)) for split in ('train', 'test')):
        return None
    (train_files, train_labels, classes), (test_files, test_labels, test_classes) = [
        list_image_tree(os.path.join(dataroot, split)) for split in ('train', 'test')]
    check_same_classes(os.path.join(dataroot, 'train'), classes, os.path.join(dataroot, 'test'), test_classes)
    if len(classes) != NUM_CLASSES[dataset]:
        raise UserError(f'{dataroot}/train has {len(classes)} class folders but --dataset {dataset} '
                        f'has {NUM_CLASSES[dataset]}; point --dataroot at a {dataset} image tree '
                        f'or pass the matching --dataset')
    return {'train': (train_files, train_labels), 'test': (test_files, test_labels)}


def list_image_tree(root):
    """(files, labels, classes) of root/<class>/...: every sub-folder of root is a class, numbered
    in sorted order, and its images at any depth below it belong to it, in the order
    torchvision's ImageFolder lists them (walked with links followed, sorted); files without an
    image extension are left out. Only names are read, so this is quick even for ImageNet."""
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        folders = [images_below(os.path.join(root, c)) for c in classes]
    except OSError as e:
        raise UserError(f'cannot list {e.filename} ({e.strerror}); check the data folder') from None
    if not classes:
        raise UserError(f'no images found under {root}/<class>/; expected PNG or JPEG files '
                        f'in one folder per class')
    files, labels = [], []
    for label, (c, names) in enumerate(zip(classes, folders)):
        # An empty folder still takes a label, so the network would get a class it never sees.
        if not names:
            raise UserError(f'class folder {os.path.join(root, c)} holds no images '
                            f'({", ".join(IMAGE_EXTENSIONS)}); add its images or remove the folder')
        files += names
        labels += [label] * len(names)
    return files, labels, classes


def images_below(folder):
    """The image files at any depth below `folder`. A link to a folder above itself would list
    the same images again at every level, and a name with an image's extension that is not a
    regular file (a pipe, a socket, a device, a broken link) could block or fail the decoding
    later: both are refused now."""
    found = []

    def visit(path):
        here, names = os.path.realpath(path), []
        with os.scandir(path) as entries:  # a directory entry says what it is without another call
            for e in entries:
                if e.is_dir():
                    target = os.path.realpath(e.path)
                    if here == target or here.startswith(target + os.sep):
                        raise UserError(f'{e.path} links to {target}, a folder above it, so its images would be '
                                        f'listed again at every level; remove the link')
                    visit(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    if not e.is_file():
                        raise UserError(f'{e.path} is not a regular file (a pipe, socket, device or broken link), '
                                        f'so it cannot be read as an image; remove it')
                    names.append(e.name)
        found.append((path, sorted(names)))
    visit(folder)
    return [os.path.join(path, n) for path, names in sorted(found) for n in names]


def check_same_classes(first, first_classes, second, second_classes):
    """Labels are positions in the sorted list of class folders, so one folder renamed, added or
    missing in one split shifts the labels of every class after it."""
    if first_classes == second_classes:
        return

    def names(only):
        return ', '.join(only[:3]) + (f' and {len(only) - 3} more' if len(only) > 3 else '') or 'none'

    only_first = sorted(set(first_classes) - set(second_classes))
    only_second = sorted(set(second_classes) - set(first_classes))
    raise UserError(f'{first} and {second} have different class folders (only in '
                    f'{os.path.basename(first)}: {names(only_first)}; only in {os.path.basename(second)}: '
                    f'{names(only_second)}); both splits need the same ones')


# Pillow's modes with more than 8 bits per sample: converting them to RGB clips at 255.
WIDE_MODES = ('I', 'F', 'I;16', 'I;16L', 'I;16B', 'I;16N')


def refuse_wide_samples(path, im):
    if im.mode in WIDE_MODES:
        raise UserError(f'{path} has {im.mode} samples, which RGB would clip to 8 bits; '
                        f'save it as an 8-bit PNG or JPEG')


def decode_images(files, threads=4):
    """The files as one uint8 N x 3 x 32 x 32 tensor; grayscale, palette and RGBA images are
    converted to RGB (alpha is dropped, not blended)."""
    def decode(path):
        try:
            with open_image(path) as im:
                if im.size != (32, 32):
                    raise UserError(f'{path} is not a 32x32 image; the CIFAR networks need 32x32 inputs')
                refuse_wide_samples(path, im)
                return torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1)
        except OSError as e:
            raise UserError(f'cannot decode image {path} ({e}); remove or replace the file')

    # Pillow releases the GIL while decoding, so threads speed this up. The warning filter is
    # set once here, not in each thread: catch_warnings is not thread-safe.
    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        with refusing_decompression_bombs():
            return torch.stack(list(pool.map(decode, files, chunksize=256)))
    finally:  # on an error or a signal, the images not yet decoded are dropped, not waited for
        pool.shutdown(cancel_futures=True)


@contextlib.contextmanager
def refusing_decompression_bombs():
    """Within it, Pillow's DecompressionBombWarning (an image of more than Image.MAX_IMAGE_PIXELS
    pixels, which it would still decode) is raised as an error, as its DecompressionBombError
    (twice the limit) is."""
    with warnings.catch_warnings():
        warnings.simplefilter('error', Image.DecompressionBombWarning)
        yield


def open_image(path):
    """Image.open, refusing an image whose pixel count alone could exhaust memory (a
    decompression bomb) as a UserError naming the file."""
    try:
        im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f'{path} is refused as a decompression bomb ({e}); remove the file or shrink '
                        f'the image') from None
    if im.width * im.height > (Image.MAX_IMAGE_PIXELS or float('inf')):
        im.close()  # the warning went elsewhere (filters changed by another thread): refuse all the same
        raise UserError(f'{path} is refused as a decompression bomb ({im.width * im.height} pixels, '
                        f'above Pillow\'s limit of {Image.MAX_IMAGE_PIXELS}); remove the file or shrink the image')
    return im


RELEASE = {'CIFAR10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'labels'),
           'CIFAR100': ('cifar-100-python', ['train'], ['test'], 'fine_labels')}


class ArrayUnpickler(pickle.Unpickler):
    """The python release is a pickle; allow only what its numpy arrays need, so a tampered
    file cannot run code."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name}')
        return super().find_class(module, name)


def load_torchvision_release(dataroot, dataset, train):
    folder, train_files, test_files, _ = RELEASE[dataset]
    root = os.path.join(dataroot, folder)
    if not os.path.isdir(root):
        download_release(dataroot, dataset)
    batches = [read_release_batch(root, name, dataset) for name in (train_files if train else test_files)]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def check_cifar_release(dataroot, dataset):
    """Reads every batch of the python release under dataroot, if it is there, so that a
    damaged one is refused before anything is written. Reading the pickles takes well under a
    second; load_cifar reads them again rather than holding 180 MB from this check."""
    root = os.path.join(dataroot, RELEASE[dataset][0])
    if os.path.isdir(root):  # else load_cifar downloads it, and checks it as it reads it
        for name in RELEASE[dataset][1] + RELEASE[dataset][2]:
            read_release_batch(root, name, dataset)


def read_release_batch(root, name, dataset):
    """(images uint8 N x 3 x 32 x 32, labels int64 N) of one batch file of the python release,
    refused unless it holds one 3,072-byte row (32x32 RGB) per image and one valid label each."""
    path, label_key = os.path.join(root, name), RELEASE[dataset][3]
    again = f'delete {root} and unpack the {dataset} python release there again'
    try:
        with open(path, 'rb') as f:
            batch = ArrayUnpickler(f, encoding='latin1').load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f'cannot read {path} ({e}); {again}') from None
    if isinstance(batch, dict):
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or 'data' not in batch or label_key not in batch:
        raise UserError(f'{path} is not a {dataset} batch (no "data" and "{label_key}" entries); {again}')
    data, labels = batch['data'], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = f'{data.dtype} rows of shape {data.shape[1:]}' if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f'{path} holds {shape}, not uint8 rows of 3,072 bytes (32x32 RGB); {again}')
    if labels.shape != (len(data),):
        raise UserError(f'{path} holds {len(data)} images but {labels.size} labels; {again}')
    if len(labels) and (labels.dtype.kind not in 'iu' or labels.min() < 0 or labels.max() >= NUM_CLASSES[dataset]):
        raise UserError(f'{path} holds labels outside 0..{NUM_CLASSES[dataset] - 1}; {again}')
    return torch.from_numpy(data).view(-1, 3, 32, 32), torch.from_numpy(labels.astype(np.int64))


def download_release(dataroot, dataset):
    from torchvision import datasets
    try:
        getattr(datasets, dataset)(dataroot, download=True)
    except Exception as e:
        raise UserError(
            f'{dataset} not found in {os.path.abspath(dataroot)} (looked for an image tree '
            f'train/<class>/, test/<class>/ and for {RELEASE[dataset][0]}/) and the download '
            f'failed ({type(e).__name__}); put either layout there and pass --dataroot DIR') from None


def reflect(index, size):
    """Maps coordinates in [-size+1, 2*size-2] into [0, size) the way reflect padding does
    (edge pixel not repeated: ...c b | a b c ... )."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def random_crop_flip(x, pad, generator, padding='reflect'):
    """Pad by `pad` (reflect, or zero: black pixels, as torchvision's RandomCrop(padding=pad)),
    crop back to the original size at a random offset and mirror with p = 0.5, independently
    per image, in one gather over the uint8 batch. Both paddings draw the same offsets."""
    B, C, H, W = x.shape
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    flip = torch.randint(0, 2, (B, 1), generator=generator, device=dev).bool()
    i, j = torch.arange(H, device=dev), torch.arange(W, device=dev)
    rows, cols = oy - pad + i, ox - pad + torch.where(flip, W - 1 - j, j)
    inside = None
    if padding == 'reflect':
        rows, cols = reflect(rows, H), reflect(cols, W)
    else:  # gather any in-image pixel, then black out those that fell in the padding
        inside = ((rows >= 0) & (rows < H))[:, :, None, None] & ((cols >= 0) & (cols < W))[:, None, :, None]
        rows, cols = rows.clamp(0, H - 1), cols.clamp(0, W - 1)
    out = x[torch.arange(B, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return (out if inside is None else out * inside).permute(0, 3, 1, 2)


class Loader:
    """Iterates (normalised float images, labels, share, index) batches over in-memory uint8
    images; `share` is this process's fraction of the global batch (1 without torchrun) and
    `index` the batch's positions in the dataset (what CRD's memory is indexed by).

    With `train`, each epoch is a fresh permutation plus (with `augment`) random crop and flip, drawn from a
    generator seeded by (seed, epoch): an epoch's batches depend only on its number, so a
    resumed run sees the same data as an uninterrupted one. Under torchrun every process draws
    the same global batch and keeps its own slice of it. Batches come in the memory layout the
    step computes in (channels_last or NCHW), so none is converted twice.

    With `strong_view` (a method reads it: methods.base.Method.reads), each training batch also
    carries a strongly augmented view of the same images as a fifth element (datasets/strong_view.py),
    drawn from a generator of its own seeded by (seed, epoch, batch): the batches, and so the runs
    that do not read it, are those of a loader without it."""

    def __init__(self, images, labels, batch_size, train, pad=4, seed=0, dtype=torch.float32,
                 channels_last=False, padding='reflect', normalization='cifar10', augment=True, strong_view=False):
        self.images, self.labels, self.augment, self.strong_view = images, labels, augment, strong_view
        self.batch_size, self.train, self.pad, self.seed = batch_size, train, pad, seed
        self.dtype, self.channels_last, self.padding = dtype, channels_last, padding
        dev = images.device
        mean, std = NORMALIZATION[normalization]
        self.mean = torch.tensor(mean, device=dev, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=dev, dtype=dtype).view(1, 3, 1, 1)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        """The next iteration yields `epoch`'s batches, leaving out the first `skip`."""
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        n = len(self.images)
        gen = torch.Generator(self.images.device)
        gen.manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=gen, device=self.images.device) if self.train else None
        skip, self.skip = self.skip, 0
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        for b, start in enumerate(range(0, n, self.batch_size)):
            idx = order[start:start + self.batch_size] if self.train else slice(start, start + self.batch_size)
            x = self.images[idx]
            if self.train and self.augment:  # pad 0: a flip alone, as the original code's transforms
                x = random_crop_flip(x, self.pad, gen, self.padding)  # drawn even when skipped: keeps gen in step
            if b < skip:
                continue
            share = distributed.share(len(x))
            index = idx if self.train else torch.arange(start, start + len(x), device=self.images.device)
            x, y, index = distributed.shard(x), distributed.shard(self.labels[idx]), distributed.shard(index)
            # The crop's gather leaves the batch NHWC in memory; the reference path computes NCHW.
            x = x.contiguous(memory_format=layout)
            if not (self.train and self.strong_view):
                yield (x.to(self.dtype) - self.mean) / self.std, y, share, index
                continue
            strong = distributed.shard(strong_view(self.images[idx], self.pad if self.augment else None,
                                                   self.strong_generator(b), self.padding))
            yield ((x.to(self.dtype) - self.mean) / self.std, y, share, index,
                   (strong.contiguous(memory_format=layout).to(self.dtype) - self.mean) / self.std)

    def strong_generator(self, b):
        """The generator of batch b's strong view in this epoch: seeded apart from the batches' own
        (seeds from 2**63 up, theirs far below), and per batch, so that a skipped batch draws nothing."""
        gen = torch.Generator(self.images.device)
        return gen.manual_seed((1 << 63) + ((self.seed * 100003 + self.epoch) * 1000003 + b) % (1 << 63))

"""CIFAR data held in memory as uint8 tensors, augmented in batches.

The whole of CIFAR is 180 MB as uint8, so it is decoded once and kept as one tensor (on the
GPU when training there). Each batch is cropped, flipped and normalised with a few tensor ops
instead of per-image PIL transforms in worker processes.
"""
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

import distributed
from errors import UserError

# Per-channel statistics of the CIFAR-10 training set on the 0..255 scale, as in the reference
# code; used for CIFAR-100 too.
MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)
NUM_CLASSES = {'CIFAR10': 10, 'CIFAR100': 100}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.ppm')


def load_cifar(dataroot, dataset, train, threads=4):
    """Returns (images uint8 N x 3 x 32 x 32, labels int64 N) for the train or test split.

    `dataroot` holds either an image tree (train/<class>/*, test/<class>/*, class folders
    sorted in label order) or the python release of `dataset` (cifar-10-batches-py/ or
    cifar-100-python/, which torchvision downloads there when it is missing)."""
    split = 'train' if train else 'test'
    if os.path.isdir(os.path.join(dataroot, 'train')) and os.path.isdir(os.path.join(dataroot, 'test')):
        images, labels, n_classes = load_image_tree(os.path.join(dataroot, split), threads)
        if n_classes != NUM_CLASSES[dataset]:
            raise UserError(f'{dataroot}/{split} has {n_classes} class folders but --dataset {dataset} '
                            f'has {NUM_CLASSES[dataset]}; point --dataroot at a {dataset} image tree '
                            f'or pass the matching --dataset')
        return images, labels
    return load_torchvision_release(dataroot, dataset, train)


def load_image_tree(root, threads=4):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for label, c in enumerate(classes):
        names = sorted(n for n in os.listdir(os.path.join(root, c))
                       if n.lower().endswith(IMAGE_EXTENSIONS))
        files += [os.path.join(root, c, n) for n in names]
        labels += [label] * len(names)
    if not files:
        raise UserError(f'no images found under {root}/<class>/; expected PNG or JPEG files '
                        f'in one folder per class')

    def decode(path):
        try:
            with Image.open(path) as im:
                return torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1)
        except OSError as e:
            raise UserError(f'cannot decode image {path} ({e}); remove or replace the file')

    # Pillow releases the GIL while decoding, so threads speed this up.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        images = list(pool.map(decode, files, chunksize=256))
    odd = next((f for f, im in zip(files, images) if im.shape != (3, 32, 32)), None)
    if odd is not None:
        raise UserError(f'{odd} is not a 32x32 image; the CIFAR networks need 32x32 inputs')
    return torch.stack(images), torch.tensor(labels), len(classes)


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
    folder, train_files, test_files, label_key = RELEASE[dataset]
    root = os.path.join(dataroot, folder)
    if not os.path.isdir(root):
        download_release(dataroot, dataset)
    images, labels = [], []
    for name in train_files if train else test_files:
        path = os.path.join(root, name)
        try:
            with open(path, 'rb') as f:
                batch = ArrayUnpickler(f, encoding='latin1').load()
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise UserError(f'cannot read {path} ({e}); delete {root} and unpack the {dataset} '
                            f'python release there again') from None
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images.append(torch.from_numpy(np.asarray(batch['data'], dtype=np.uint8)).view(-1, 3, 32, 32))
        labels.append(torch.tensor(batch[label_key], dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


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


def random_crop_flip(x, pad, generator):
    """Reflect-pad by `pad`, crop back to the original size at a random offset and mirror
    with p = 0.5, independently per image, in one gather over the uint8 batch."""
    B, C, H, W = x.shape
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    flip = torch.randint(0, 2, (B, 1), generator=generator, device=dev).bool()
    i, j = torch.arange(H, device=dev), torch.arange(W, device=dev)
    rows = reflect(oy - pad + i, H)
    cols = reflect(ox - pad + torch.where(flip, W - 1 - j, j), W)
    out = x[torch.arange(B, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class Loader:
    """Iterates (normalised float images, labels) batches over in-memory uint8 images.

    With `train`, each epoch is a fresh permutation plus random crop and flip, drawn from a
    generator seeded by (seed, epoch): an epoch's batches depend only on its number, so a
    resumed run sees the same data as an uninterrupted one. Under torchrun every process draws
    the same global batch and keeps its own slice of it."""

    def __init__(self, images, labels, batch_size, train, pad=4, seed=0, dtype=torch.float32):
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.pad, self.seed = batch_size, train, pad, seed
        self.dtype = dtype
        dev = images.device
        self.mean = torch.tensor(MEAN, device=dev, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=dev, dtype=dtype).view(1, 3, 1, 1)
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
        for b, start in enumerate(range(0, n, self.batch_size)):
            idx = order[start:start + self.batch_size] if self.train else slice(start, start + self.batch_size)
            x = self.images[idx]
            if self.train and self.pad > 0:
                x = random_crop_flip(x, self.pad, gen)  # drawn even when skipped: keeps gen in step
            if b < skip:
                continue
            x, y = distributed.shard(x), distributed.shard(self.labels[idx])
            yield (x.to(self.dtype) - self.mean) / self.std, y

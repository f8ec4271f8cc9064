"""ImageNet-style image folders (`train/<class>/*`, `val/<class>/*`) as batches on the device.

At ImageNet scale JPEG decoding is the bottleneck, so the pipeline keeps the CPU's work to the
minimum that must happen per image and moves the rest to the device:
- worker processes (--nthread) decode, crop and resize with Pillow in one call (`resize(box=)`
  never materialises the crop) and hand over uint8 HWC arrays;
- batches cross to the device as uint8 (4x fewer bytes than float) from pinned memory with
  non-blocking copies, so the copy overlaps the previous step;
- the NHWC uint8 batch is permuted, not copied, into a channels_last NCHW view, then converted
  and normalised on the device in one pass.
Augmentation is the standard one: RandomResizedCrop to 224 (scale 0.08-1, aspect 3/4-4/3) and a
horizontal flip for training; resize to 256 and centre crop 224 for validation.
"""
import math
import os

import numpy as np
import torch
from PIL import Image

from datasets.cifar import (
    check_same_classes,
    list_image_tree,
    open_image,
    refuse_wide_samples,
    refusing_decompression_bombs,
)
from engine import distributed
from engine.errors import UserError

# Per-channel statistics of the ImageNet training set on the 0..255 scale (torchvision's).
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP, RESIZE = 224, 256


def list_image_folder(root):
    """(paths, labels, class names) of root/<class>/*, classes in sorted order as torchvision's
    ImageFolder numbers them, so its checkpoints' outputs mean the same classes."""
    if not os.path.isdir(root):
        raise UserError(f'{root} does not exist; --imagenetpath should hold train/<class>/ and val/<class>/')
    return list_image_tree(root)


def check_image_folders(imagenetpath):
    """Refuses, from folder listings alone (no image is opened), folders that would train on
    wrong labels: train/ and val/ with different class folders, or a class folder without
    images."""
    train, val = os.path.join(imagenetpath, 'train'), os.path.join(imagenetpath, 'val')
    classes = list_image_folder(train)[2]
    check_same_classes(train, classes, val, list_image_folder(val)[2])
    if len(classes) < 2:
        raise UserError(f'{train} has one class folder ({classes[0]}); a classifier needs two classes or more: '
                        f'add their folders to train/ and val/')


def random_resized_crop_box(width, height, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """A box covering a random 8-100% of the image area with a random aspect ratio (log-uniform),
    retried up to ten times before falling back to the largest centred box of a ratio in range
    (Szegedy et al. 2015, as torchvision's RandomResizedCrop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, left + w, top + h
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_crop_box(width, height):
    """The region that `resize shorter side to 256, centre crop 224` keeps, in source pixels."""
    side = min(width, height) * CROP / RESIZE
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


class ImageFiles(torch.utils.data.Dataset):
    """Item (index, seed) -> (uint8 CROP x CROP x 3 array, label, index). The seed drives that image's
    augmentation, so an epoch's crops depend only on (run seed, epoch), not on worker state."""

    def __init__(self, paths, labels, train):
        self.paths, self.labels, self.train = paths, labels, train

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key
        path = self.paths[index]
        try:
            # One image per call in a worker process (or the main thread): the filter is safe here.
            with refusing_decompression_bombs(), open_image(path) as im:
                refuse_wide_samples(path, im)
                im = im.convert('RGB')
        except OSError as e:
            raise UserError(f'cannot decode image {path} ({e}); remove or replace the file') from None
        if self.train:
            generator = torch.Generator().manual_seed(seed)
            box = random_resized_crop_box(*im.size, generator)
            im = im.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box)
            if torch.rand(1, generator=generator).item() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            im = im.resize((CROP, CROP), Image.Resampling.BILINEAR, box=center_crop_box(*im.size))
        return torch.from_numpy(np.array(im)), self.labels[index], index


class EpochOrder(torch.utils.data.Sampler):
    """Yields each batch as a list of (index, augmentation seed) pairs: for training a permutation
    and seeds drawn from a generator seeded by (run seed, epoch), so a resumed run sees the
    batches of an uninterrupted one; for validation the files in order. Under torchrun each
    process gets only its slice of every batch, so no image is decoded twice. It runs in the
    main process, so it sees set_epoch even when the workers persist across epochs."""

    def __init__(self, n, batch_size, shuffle, seed):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch, self.skip = 0, 0

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            keys = torch.stack([torch.randperm(self.n, generator=generator),
                                torch.randint(2 ** 62, (self.n,), generator=generator)], 1)
        else:
            keys = torch.stack([torch.arange(self.n), torch.zeros(self.n, dtype=torch.int64)], 1)
        skip, self.skip = self.skip, 0
        for start in range(skip * self.batch_size, self.n, self.batch_size):
            yield distributed.shard(keys[start:start + self.batch_size]).tolist()


class ImageFolderLoader:
    """Normalised (x, y, share, index) batches of one split on `device`, x in `dtype` and, with
    `channels_last`, in that memory layout; `set_epoch(e)` chooses the epoch's order."""

    def __init__(self, root, batch_size, train, *, seed=0, nthread=4, device=torch.device('cpu'),
                 dtype=torch.float32, channels_last=False):
        paths, labels, self.classes = list_image_folder(root)
        self.labels = torch.tensor(labels)  # of every image, in dataset order (a method may keep a memory of them)
        self.batch_size = batch_size
        self.order = EpochOrder(len(paths), batch_size, shuffle=train, seed=seed)
        workers = dict(num_workers=nthread, persistent_workers=True, prefetch_factor=4) if nthread > 0 else {}
        self.batches = torch.utils.data.DataLoader(ImageFiles(paths, labels, train), batch_sampler=self.order,
                                                   pin_memory=device.type == 'cuda', **workers)
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.mean = torch.tensor(MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device, dtype=dtype).view(1, 3, 1, 1)

    def set_epoch(self, epoch, skip=0):
        """The next iteration yields `epoch`'s batches, leaving out the first `skip` (undecoded)."""
        self.order.epoch, self.order.skip = epoch, skip

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        """(x, y, share, index) batches; `share` is this process's fraction of the global batch,
        `index` the images' positions in the folder's list."""
        n, skip = self.order.n, self.order.skip  # read before iterating resets skip
        try:
            for b, (x, y, index) in enumerate(self.batches, skip):
                share = distributed.share(min(self.batch_size, n - b * self.batch_size))
                x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC is channels_last NCHW
                if not self.channels_last:
                    x = x.contiguous()
                yield ((x.to(self.dtype) - self.mean) / self.std, y.to(self.device, non_blocking=True), share,
                       index.to(self.device, non_blocking=True))
        except UserError as e:
            # A worker's error arrives wrapped with its traceback; keep the one line for the user.
            raise UserError(str(e).strip().splitlines()[-1].split('UserError: ', 1)[-1]) from None

"""A second, strongly augmented view of a training batch, for the methods that ask for one
(methods.base.Method.reads 'strong_view': MLKD).

The view is FixMatch's RandAugment as MLKD's authors build it (Sohn et al., NeurIPS 2020; their
mdistiller fork's dataset/cifar100.py): an independent random crop and flip of the original image
(--randomcrop_pad, --crop_padding, none with --augment off), then two operations drawn uniformly,
with replacement, from the fourteen below, each at a magnitude drawn uniformly from its range,
then a Cutout of a random square of up to half the image's side, filled with grey (125, 123, 114).

    AutoContrast, Brightness [0.05, 0.95], Color [0.05, 0.95], Contrast [0.05, 0.95], Equalize,
    Identity, Posterize [4, 8] bits, Rotate [-30, 30] degrees, Sharpness [0.05, 0.95],
    ShearX / ShearY [-0.3, 0.3], Solarize [0, 256], TranslateX / TranslateY [-0.3, 0.3] of the side

Everything runs on the uint8 batch where it is held (the GPU when training there), each image with
its own operations and magnitudes, all drawn from one generator that the loader seeds per batch,
so that a batch's strong view depends only on (data seed, epoch, batch) and a resumed run sees the
same views as an uninterrupted one. The operations follow Pillow's definitions (ImageEnhance's
blends, ImageOps' equalize and autocontrast, Image.transform's affine maps sampled at pixel centres
by the nearest pixel, black outside) computed in tensor arithmetic; the pixels may differ from
Pillow's by a rounding.
"""
import math

import torch

CUTOUT_FILL = (125, 123, 114)
# (name, lowest magnitude, highest magnitude), in the authors' order
OPERATIONS = (('autocontrast', 0, 1), ('brightness', 0.05, 0.95), ('color', 0.05, 0.95), ('contrast', 0.05, 0.95),
              ('equalize', 0, 1), ('identity', 0, 1), ('posterize', 4, 8), ('rotate', -30, 30),
              ('sharpness', 0.05, 0.95), ('shear_x', -0.3, 0.3), ('shear_y', -0.3, 0.3), ('solarize', 0, 256),
              ('translate_x', -0.3, 0.3), ('translate_y', -0.3, 0.3))
N_OPERATIONS = 2


def strong_view(x, pad, generator, padding='reflect'):
    """The strong view of the uint8 batch `x` (B x 3 x H x W): crop and flip (pad None: neither),
    RandAugment and Cutout, drawn from `generator` in a fixed order."""
    from datasets.cifar import random_crop_flip
    if pad is not None:
        x = random_crop_flip(x, pad, generator, padding)
    B, dev = len(x), x.device
    chosen = torch.randint(0, len(OPERATIONS), (B, N_OPERATIONS), generator=generator, device=dev)
    level = torch.rand(B, N_OPERATIONS, generator=generator, device=dev, dtype=torch.float64)
    square = torch.rand(B, 3, generator=generator, device=dev, dtype=torch.float64)  # side, left, top
    x = x.clone()
    for k in range(N_OPERATIONS):
        for op, (name, low, high) in enumerate(OPERATIONS):
            which = (chosen[:, k] == op).nonzero().flatten()
            if len(which) and name != 'identity':
                x[which] = APPLY[name](x[which], (low + (high - low) * level[which, k]).float())
    return cutout(x, square)


def blend(degenerate, x, factor):
    """ImageEnhance's enhance(factor): degenerate + factor * (x - degenerate), clipped to 0..255."""
    f = factor.view(-1, 1, 1, 1)
    return (degenerate + f * (x.float() - degenerate)).clamp(0, 255).to(torch.uint8)


def grey(x):
    """Pillow's RGB -> L (ITU-R 601-2 luma in its fixed point), as a float image of one channel."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).float()[:, None]


def brightness(x, v):
    return blend(torch.zeros_like(x, dtype=torch.float32), x, v)


def color(x, v):
    return blend(grey(x).expand_as(x), x, v)


def contrast(x, v):
    mean = (grey(x).mean((1, 2, 3), keepdim=True) + 0.5).floor()
    return blend(mean.expand_as(x), x, v)


def sharpness(x, v):
    """The degenerate image is Pillow's SMOOTH filter (3x3, centre 5, the rest 1, over 13); the
    border pixels keep their values."""
    kernel = torch.ones(3, 1, 3, 3, device=x.device)
    kernel[:, :, 1, 1] = 5
    smooth = (torch.nn.functional.conv2d(x.float(), kernel / 13, groups=3) + 0.5).floor()
    degenerate = x.float().clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return blend(degenerate, x, v)


def autocontrast(x, v):
    """Each channel stretched to 0..255 from its own minimum and maximum (unchanged where flat)."""
    lo, hi = x.amin((2, 3), keepdim=True).float(), x.amax((2, 3), keepdim=True).float()
    scale = 255 / (hi - lo).clamp(min=1)
    out = ((x.float() - lo) * scale).clamp(0, 255).floor().to(torch.uint8)
    return torch.where(hi > lo, out, x)


def equalize(x, v):
    """Pillow's ImageOps.equalize per channel: a lookup table from the cumulative histogram, with the
    step (count of all pixels but those of the brightest value present) // 255."""
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    brightest = flat.amax(1, keepdim=True)
    step = (H * W - hist.gather(1, brightest)) // 255
    before = hist.cumsum(1) - hist  # pixels darker than each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    out = lut.gather(1, flat).to(torch.uint8).view(B, C, H, W)
    return torch.where((step > 0).view(B, C, 1, 1), out, x)


def posterize(x, v):
    bits = v.long().clamp(1, 8).view(-1, 1, 1, 1)
    keep = (255 << (8 - bits)) & 255
    return x & keep.to(torch.uint8)


def solarize(x, v):
    return torch.where(x.float() >= v.view(-1, 1, 1, 1), 255 - x, x)


def affine(x, a, b, c, d, e, f):
    """Image.transform(AFFINE, (a, b, c, d, e, f)) with NEAREST: output pixel (i, j) takes the input
    pixel holding the point (a X + b Y + c, d X + e Y + f), (X, Y) = (j + 0.5, i + 0.5); black where
    that falls outside. Each coefficient is a tensor of one value per image."""
    B, C, H, W = x.shape
    dev = x.device
    Y, X = torch.meshgrid(torch.arange(H, device=dev) + 0.5, torch.arange(W, device=dev) + 0.5, indexing='ij')

    def per_image(t):
        return t.view(-1, 1, 1).to(torch.float64)
    X, Y = X.double(), Y.double()
    u = (per_image(a) * X + per_image(b) * Y + per_image(c)).floor().long()
    w = (per_image(d) * X + per_image(e) * Y + per_image(f)).floor().long()
    inside = (u >= 0) & (u < W) & (w >= 0) & (w < H)
    u, w = u.clamp(0, W - 1), w.clamp(0, H - 1)
    out = x[torch.arange(B, device=dev)[:, None, None], :, w, u].permute(0, 3, 1, 2)
    return out * inside[:, None].to(x.dtype)


def rotate(x, v):
    """Image.rotate(v): counter-clockwise by v degrees about the centre."""
    H, W = x.shape[2:]
    angle = -v.double() * math.pi / 180
    a, b, d, e = angle.cos(), angle.sin(), -angle.sin(), angle.cos()
    cx, cy = W / 2, H / 2
    return affine(x, a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)


def shear_x(x, v):
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return affine(x, one, v, zero, zero, one, zero)


def shear_y(x, v):
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return affine(x, one, zero, zero, v, one, zero)


def translate_x(x, v):
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return affine(x, one, zero, v * x.shape[3], zero, one, zero)


def translate_y(x, v):
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    return affine(x, one, zero, zero, zero, one, v * x.shape[2])


APPLY = {'autocontrast': autocontrast, 'brightness': brightness, 'color': color, 'contrast': contrast,
         'equalize': equalize, 'posterize': posterize, 'rotate': rotate, 'sharpness': sharpness, 'shear_x': shear_x,
         'shear_y': shear_y, 'solarize': solarize, 'translate_x': translate_x, 'translate_y': translate_y}


def cutout(x, square):
    """FixMatch's Cutout as the authors draw it: a square of side s = u0 * W / 2 about a centre
    drawn from (1, W] x (1, H] (their np.random.uniform(w), whose one argument is the lower bound),
    its corner (left, top) moved inside the image and truncated, set to grey (ImageDraw's rectangle:
    both corners included). `square` holds (u0, u1, u2) per image, uniform in [0, 1)."""
    B, C, H, W = x.shape
    dev = x.device
    side = square[:, 0] * 0.5 * W
    left = (W - (W - 1) * square[:, 1] - side / 2).clamp(min=0).floor()
    top = (H - (H - 1) * square[:, 2] - side / 2).clamp(min=0).floor()
    right, bottom = (left + side).clamp(max=W), (top + side).clamp(max=H)
    j, i = torch.arange(W, device=dev, dtype=torch.float64), torch.arange(H, device=dev, dtype=torch.float64)
    cols = (j >= left[:, None]) & (j <= right[:, None])
    rows = (i >= top[:, None]) & (i <= bottom[:, None])
    hole = (rows[:, :, None] & cols[:, None, :] & (side > 0)[:, None, None])[:, None]
    fill = torch.tensor(CUTOUT_FILL, dtype=x.dtype, device=dev).view(1, 3, 1, 1)
    return torch.where(hole, fill, x)

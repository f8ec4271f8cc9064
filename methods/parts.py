"""Learned parts that several methods share, as pure functions over the 'aux.' entries of the
parameter dict (each constructor beside the function that applies it), and the shape checks with
which a method refuses a pair of networks it cannot compare."""
import torch
import torch.nn.functional as F

from engine.errors import UserError
from utils import batch_norm


def unit_bnparams(n):
    """A batch norm as torch's BatchNorm2d starts (scale 1, shift 0), which the learned parts
    taken from RepDistiller and mdistiller keep (the networks' bnparams draw the scale from [0, 1))."""
    return {'weight': torch.ones(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


def torch_conv_params(shape, fan_in, n_bias):
    """{'weight', 'bias'} as torch's Conv2d and ConvTranspose2d start (kaiming-uniform with
    a = sqrt(5), bias uniform in +-1/sqrt(fan_in)), which RepDistiller's learned parts keep."""
    bound = fan_in ** -0.5
    return {'weight': torch.nn.init.kaiming_uniform_(torch.empty(shape), a=5 ** 0.5),
            'bias': torch.empty(n_bias).uniform_(-bound, bound)}


def torch_linear_params(n_in, n_out):
    """{'weight', 'bias'} as torch's Linear starts (both uniform in +-1/sqrt(n_in)), which the
    embeddings of RepDistiller's CC and CRD keep."""
    return torch_conv_params((n_out, n_in), n_in, n_out)


def torch_conv_weight(c_in, c_out, k=1):
    """A bias-free convolution's weight as torch's Conv2d starts it (uniform in +-1/sqrt(fan_in)),
    which RepDistiller's VID regressors keep."""
    return torch.nn.init.kaiming_uniform_(torch.empty(c_out, c_in, k, k), a=5 ** 0.5)


def conv_with_bias(c_in, c_out, kh, kw=None):
    kw = kh if kw is None else kw
    return torch_conv_params((c_out, c_in, kh, kw), c_in * kh * kw, c_out)


def transposed_conv_with_bias(c_in, c_out, k):
    # A transposed convolution's weight is (in, out, k, k); torch takes its fan-in from `out`.
    return torch_conv_params((c_in, c_out, k, k), c_out * k * k, c_out)


# ----------------------------------------------------------------------------------------------
# Connectors from a student group to the teacher's (AB, OFD) and RepDistiller's ConvReg (AB, FitNets)

def connector_params(c_s, c_t):
    """A 1x1 conv (no bias) and BN from c_s to c_t channels, initialised as mdistiller's
    ConnectorConvBN (and RepDistiller's AB Connector): weights normal with std sqrt(2 / (k k c_t)),
    BN scale 1 and shift 0."""
    return {'conv': torch.randn(c_t, c_s, 1, 1) * (2 / c_t) ** 0.5, 'bn': unit_bnparams(c_t)}


def connector(x, params, base, mode):
    return batch_norm(F.conv2d(x, params[base + '.conv']), params, base + '.bn', mode)


def convreg_params(shape_s, shape_t, always=False):
    """RepDistiller's Connector of one group: nothing where the two groups have the same channels
    and size, else its ConvReg without ReLU, a convolution with bias and a BN to the teacher's
    channels: 3x3 with stride 2 ('down') for a student group twice the teacher's size, 4x4
    transposed with stride 2 ('up') for half its size, else an unpadded (1 + H_s - H_t) x
    (1 + W_s - W_t) convolution ('conv'). shape_*: (C, H, W); the caller refuses a student group
    smaller than the teacher's other than by half (connectable). `always`: a regressor even where
    the shapes match (FitNets' hint, RepDistiller's ConvReg itself)."""
    (c_s, h_s, w_s), (c_t, h_t, w_t) = shape_s, shape_t
    if c_s == c_t and h_s == h_t and not always:
        return {}
    if h_s == 2 * h_t:
        conv = {'down': conv_with_bias(c_s, c_t, 3)}
    elif 2 * h_s == h_t:
        conv = {'up': transposed_conv_with_bias(c_s, c_t, 4)}
    else:
        conv = {'conv': conv_with_bias(c_s, c_t, 1 + h_s - h_t, 1 + w_s - w_t)}
    return {**conv, 'bn': unit_bnparams(c_t)}


def convreg(x, params, base, mode):
    """A student group mapped by its connector (convreg_params) to the teacher's shape."""
    if base + '.bn.weight' not in params:
        return x
    if base + '.down.weight' in params:
        x = F.conv2d(x, params[base + '.down.weight'], params[base + '.down.bias'], stride=2, padding=1)
    elif base + '.up.weight' in params:
        x = F.conv_transpose2d(x, params[base + '.up.weight'], params[base + '.up.bias'], stride=2, padding=1)
    else:
        x = F.conv2d(x, params[base + '.conv.weight'], params[base + '.conv.bias'])
    return batch_norm(x, params, base + '.bn', mode)


# ----------------------------------------------------------------------------------------------
# Pairs a method cannot compare

def same_size(s, t, g, flag):
    if s.shape[2:] != t.shape[2:]:
        raise UserError(f'{flag} compares outputs of group {g}, which are {tuple(s.shape[2:])} in the '
                        f'student and {tuple(t.shape[2:])} in the teacher; pick networks whose '
                        f'groups have the same spatial sizes')


def connectable(s, t, g, flag):
    """RepDistiller's ConvReg maps a student group of the teacher's size or larger, or of half
    its size, to the teacher's shape."""
    if s.shape[2] < t.shape[2] and 2 * s.shape[2] != t.shape[2]:
        raise UserError(f'{flag} connects group {g}, which is {tuple(s.shape[2:])} in the student and '
                        f'{tuple(t.shape[2:])} in the teacher; a connector maps a larger group, or one '
                        f'of half the size, to the teacher\'s: pick other networks or drop {flag}')


def equal_widths(groups_s, groups_t, flag, name, stem_s=None, stem_t=None):
    """FSP and KDSVD compare matrices whose sides are the groups' (and FSP's the stem's) channels."""
    if stem_s is not None and stem_s.shape[1] != stem_t.shape[1]:
        raise UserError(f'--{flag}: {name} compares the stems\' channels too, and the stem has {stem_s.shape[1]} '
                        f'in the student and {stem_t.shape[1]} in the teacher; pick networks of equal widths, '
                        f'or drop --{flag}')
    for g, (s, t) in enumerate(zip(groups_s, groups_t)):
        if s.shape[1] != t.shape[1]:
            raise UserError(f'--{flag}: {name} compares the groups\' channels one to one, and group {g} '
                            f'has {s.shape[1]} in the student and {t.shape[1]} in the teacher; pick '
                            f'networks whose groups have equal widths, or drop --{flag}')

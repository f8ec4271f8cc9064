"""The parts that methods learn beside the student, as pure functions over the 'aux.' entries
of the parameter dict: trained (or, for CRD's memory, updated) and checkpointed with the
student, never deployed with it. Each method's constructor of its parameters sits next to the
function that applies them."""
import torch
import torch.nn.functional as F

from utils import batch_norm, linear_params

# ----------------------------------------------------------------------------------------------
# CRD: embeddings and the momentum memory of every training image

# Entries of 'aux.crd.' that are updated in the forward, never by the optimizer.
CRD_BUFFERS = ('memory_s', 'memory_t', 'z')
# The keys of one chunk of the negatives' draw: at most this many random numbers at once.
CRD_DRAW_CHUNK = 2 ** 24


def crd_params(dim_s, dim_t, feat_dim, n_data):
    """CRD's linear embeddings of the student's and the teacher's pooled features (RepDistiller's
    Embed; initialised as CC's), the memory of every training image's student ('memory_s') and
    teacher ('memory_t') embedding, each row uniform in +-1/sqrt(feat_dim/3) as RepDistiller's
    ContrastMemory starts, and the normalisation constants Z of the two scores ('z': -1 until the
    first training batch fixes them)."""
    bound = (feat_dim / 3) ** -0.5
    return {'embed_s': linear_params(dim_s, feat_dim), 'embed_t': linear_params(dim_t, feat_dim),
            'memory_s': torch.rand(n_data, feat_dim) * (2 * bound) - bound,
            'memory_t': torch.rand(n_data, feat_dim) * (2 * bound) - bound,
            'z': torch.full((2,), -1.0)}


def crd_embed(f, params, base):
    """A linear map of a pooled feature, L2-normalised per sample (RepDistiller's Embed), in fp32
    at least: its scores against the memory are exponentiated at temperature 0.07."""
    e = F.linear(f, params[base + '.weight'], params[base + '.bias'])
    e = e.to(torch.promote_types(e.dtype, torch.float32))
    return e / e.norm(dim=1, keepdim=True)


def crd_classes(labels):
    """What drawing negatives needs of the training labels (N,), computed once: the images'
    positions sorted by class, and each class's count and first place in that order."""
    counts = torch.bincount(labels)
    order = torch.argsort(labels, stable=True)
    return {'order': order, 'counts': counts, 'starts': torch.cumsum(counts, 0) - counts,
            'n': len(labels), 'fewest_others': len(labels) - int(counts.max()),
            'most_others': len(labels) - int(counts[counts > 0].min())}


def crd_negatives(classes, y, k, generator):
    """(B, k) indices of training images of other classes than each sample's label y, uniform
    without replacement, or with replacement where a class has fewer than k others: RepDistiller's
    'exact' mode. Drawn by position j among the M = N - n_c images outside the sample's class c in
    class order; the k smallest of M uniform keys are a uniform k-subset."""
    others = classes['n'] - classes['counts'][y]  # M per sample
    j = None
    if k <= classes['most_others']:
        width = classes['most_others']
        draws = []
        for rows in torch.split(others, max(1, CRD_DRAW_CHUNK // width)):  # bounded memory at ImageNet's size
            keys = torch.rand(len(rows), width, generator=generator, device=y.device)
            keys.masked_fill_(torch.arange(width, device=y.device) >= rows[:, None], 2.0)  # past M: never drawn
            draws.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)  # the order does not matter
        j = torch.cat(draws)
    if k > classes['fewest_others']:  # a class has fewer than k others: its samples draw with replacement
        u = torch.rand(len(y), k, generator=generator, device=y.device, dtype=torch.float64)
        repeated = (u * others[:, None]).long().clamp_max(others[:, None] - 1)
        j = repeated if j is None else torch.where(others[:, None] >= k, j, repeated)
    start, count = classes['starts'][y][:, None], classes['counts'][y][:, None]
    return classes['order'][j + (j >= start) * count]


def crd_scores(e_s, e_t, params, base, contrast, T, n_data):
    """The two sets of scores P = exp(m . e / T) / Z of RepDistiller's ContrastMemory, each (B, 1+K)
    with the sample itself in column 0: the student's embedding against the teacher memory's rows
    at `contrast`, and the teacher's against the student memory's. Z = N times the mean score of
    the first training batch, fixed in place from then on (and checkpointed with it). Computed
    outside autocast: a bf16 dot product of unit vectors (under three significant digits), divided
    by 0.07 and exponentiated, would put a relative error of several percent on each score."""
    z = params[base + '.z']
    with torch.autocast(e_s.device.type, enabled=False):
        out_s = torch.exp(torch.bmm(params[base + '.memory_t'][contrast], e_s[:, :, None])[:, :, 0] / T)
        out_t = torch.exp(torch.bmm(params[base + '.memory_s'][contrast], e_t[:, :, None])[:, :, 0] / T)
        with torch.no_grad():  # a where, not an `if`: no value is read back to the host
            z.copy_(torch.where(z < 0, torch.stack([out_s.mean(), out_t.mean()]).to(z.dtype) * n_data, z))
        return out_s / z[0], out_t / z[1]


def crd_update_memory_(e_s, e_t, params, base, index, momentum):
    """Each batch image's memory rows move towards its new embeddings and are renormalised:
    m <- (momentum m + (1 - momentum) e) / ||...||_2 (RepDistiller's ContrastMemory)."""
    with torch.no_grad():
        for name, e in (('memory_s', e_s), ('memory_t', e_t)):
            memory = params[f'{base}.{name}']
            rows = memory[index] * momentum + e.to(memory.dtype) * (1 - momentum)
            memory.index_copy_(0, index, rows / rows.norm(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# AB and OFD: connectors from the student's groups to the teacher's

def connector_params(c_s, c_t):
    """A 1x1 conv (no bias) and BN from c_s to c_t channels, initialised as mdistiller's
    ConnectorConvBN (and RepDistiller's AB Connector): weights normal with std sqrt(2 / (k k c_t)),
    BN scale 1 and shift 0."""
    return {'conv': torch.randn(c_t, c_s, 1, 1) * (2 / c_t) ** 0.5, 'bn': unit_bnparams(c_t)}


def connector(x, params, base, mode):
    return batch_norm(F.conv2d(x, params[base + '.conv']), params, base + '.bn', mode)


def ofd_params(channels_s, channels_t, margins):
    """OFD's connector 'ofd<g>' for each pair of groups and the margin of the teacher's group,
    (C_t,) from losses.ofd_margin: a fixed buffer, never trained."""
    return {f'ofd{g}': {**connector_params(c_s, c_t), 'margin': m}
            for g, (c_s, c_t, m) in enumerate(zip(channels_s, channels_t, margins))}


def is_buffer(name):
    """Entries of 'aux.' that are kept and checkpointed but not trained (batch-norm statistics
    aside, which utils.is_running_stat names)."""
    return name.endswith('.margin')


def torch_conv_params(shape, fan_in, n_bias):
    """{'weight', 'bias'} as torch's Conv2d and ConvTranspose2d start (kaiming-uniform with
    a = sqrt(5), bias uniform in +-1/sqrt(fan_in)), which RepDistiller's learned parts keep."""
    bound = fan_in ** -0.5
    return {'weight': torch.nn.init.kaiming_uniform_(torch.empty(shape), a=5 ** 0.5),
            'bias': torch.empty(n_bias).uniform_(-bound, bound)}


def conv_with_bias(c_in, c_out, kh, kw=None):
    kw = kh if kw is None else kw
    return torch_conv_params((c_out, c_in, kh, kw), c_in * kh * kw, c_out)


def transposed_conv_with_bias(c_in, c_out, k):
    # A transposed convolution's weight is (in, out, k, k); torch takes its fan-in from `out`.
    return torch_conv_params((c_in, c_out, k, k), c_out * k * k, c_out)


def convreg_params(shape_s, shape_t, always=False):
    """AB's connector of one group (RepDistiller's Connector): nothing where the two groups have
    the same channels and size, else its ConvReg without ReLU, a convolution with bias and a BN
    to the teacher's channels: 3x3 with stride 2 ('down') for a student group twice the
    teacher's size, 4x4 transposed with stride 2 ('up') for half its size, else an unpadded
    (1 + H_s - H_t) x (1 + W_s - W_t) convolution ('conv'). shape_*: (C, H, W); the caller
    refuses a student group smaller than the teacher's other than by half. `always`: a
    regressor even where the shapes match (FitNets' hint, RepDistiller's ConvReg itself)."""
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
# FT: the paraphraser of the teacher's last group and the translator of the student's

def factor_channels(c_t, rate):
    """Channels of FT's factors: int(rate * the teacher's channels), RepDistiller's k = 0.5."""
    return int(c_t * rate)


def paraphraser_params(c_t, rate):
    """RepDistiller's Paraphraser (without batch norms, as it builds it): an encoder of three 3x3
    convolutions c_t -> c_t -> m -> m and a decoder of three 3x3 transposed convolutions
    m -> m -> c_t -> c_t, each with bias and followed by LeakyReLU(0.1); m = factor_channels."""
    m = factor_channels(c_t, rate)
    widths = [(c_t, c_t), (c_t, m), (m, m)]
    encoder = {f'conv{i}': conv_with_bias(c_in, c_out, 3) for i, (c_in, c_out) in enumerate(widths)}
    decoder = {f'deconv{i}': transposed_conv_with_bias(c_in, c_out, 3)
               for i, (c_out, c_in) in enumerate(reversed(widths))}
    return {**encoder, **decoder}


def paraphrase(x, params, base):
    """The factor of the teacher's group x: the encoder of the paraphraser at `base`."""
    for i in range(3):
        x = F.leaky_relu(F.conv2d(x, params[f'{base}.conv{i}.weight'], params[f'{base}.conv{i}.bias'], padding=1), 0.1)
    return x


def reconstruct(factor, params, base):
    """The teacher's group again from its factor: the decoder of the paraphraser at `base`."""
    x = factor
    for i in range(3):
        x = F.leaky_relu(F.conv_transpose2d(x, params[f'{base}.deconv{i}.weight'], params[f'{base}.deconv{i}.bias'],
                                            padding=1), 0.1)
    return x


def translator_params(c_s, c_t, rate):
    """RepDistiller's Translator: three 3x3 convolutions c_s -> c_s -> m -> m, each with bias,
    a batch norm and LeakyReLU(0.1); m = factor_channels of the teacher's group."""
    m = factor_channels(c_t, rate)
    params = {}
    for i, (c_in, c_out) in enumerate([(c_s, c_s), (c_s, m), (m, m)]):
        params.update({f'conv{i}': conv_with_bias(c_in, c_out, 3), f'bn{i}': unit_bnparams(c_out)})
    return params


def translate(x, params, base, mode):
    """The student's factor of its group x, by the translator at `base`."""
    for i in range(3):
        x = F.conv2d(x, params[f'{base}.conv{i}.weight'], params[f'{base}.conv{i}.bias'], padding=1)
        x = F.leaky_relu(batch_norm(x, params, f'{base}.bn{i}', mode), 0.1)
    return x


# ----------------------------------------------------------------------------------------------
# ReviewKD: attention-based fusion (ABF) of the student's groups

# mdistiller (and the authors' code) cap the fusion's width at 512 channels.
REVIEWKD_MAX_MID_CHANNELS = 512


def unit_bnparams(n):
    """A batch norm as torch's BatchNorm2d starts (scale 1, shift 0), which the learned parts
    taken from mdistiller keep (the networks' bnparams draw the scale from [0, 1))."""
    return {'weight': torch.ones(n), 'bias': torch.zeros(n),
            'running_mean': torch.zeros(n), 'running_var': torch.ones(n)}


def abf_params(c_in, c_mid, c_out, fuse):
    """One ABF module of mdistiller's ReviewKD: a 1x1 conv (no bias) and BN to c_mid channels, a
    3x3 conv (no bias) and BN to the teacher's c_out, and where it fuses a deeper level, a 1x1
    conv with bias from the two c_mid maps to two attention maps. The two convolutions start
    kaiming-uniform with a = 1 as mdistiller sets them; the attention conv as torch's Conv2d
    starts (kaiming-uniform with a = sqrt(5), bias uniform in +-1/sqrt(fan_in))."""
    init = torch.nn.init.kaiming_uniform_
    params = {'conv1': init(torch.empty(c_mid, c_in, 1, 1), a=1), 'bn1': unit_bnparams(c_mid),
              'conv2': init(torch.empty(c_out, c_mid, 3, 3), a=1), 'bn2': unit_bnparams(c_out)}
    if fuse:
        bound = (2 * c_mid) ** -0.5
        params['att'] = {'weight': init(torch.empty(2, 2 * c_mid, 1, 1), a=5 ** 0.5),
                         'bias': torch.empty(2).uniform_(-bound, bound)}
    return params


def reviewkd_params(channels_s, channels_t, mid_channels=REVIEWKD_MAX_MID_CHANNELS):
    """ABF modules 'abf<i>' for the student's levels (its groups, then its pooled feature) to the
    teacher's matching channels, min(mid_channels, the pooled feature's) wide as mdistiller's
    min(512, in_channels[-1]); every level but the deepest fuses the one below it."""
    c_mid = min(mid_channels, channels_s[-1])
    return {f'abf{i}': abf_params(c_s, c_mid, c_t, i < len(channels_s) - 1)
            for i, (c_s, c_t) in enumerate(zip(channels_s, channels_t))}


def abf(x, residual, params, base, mode, out_size):
    """One level of the review (mdistiller's ABF.forward): the student's map x is brought to the
    fusion's width; with the deeper level's fused map (`residual`, upsampled to x's size by
    nearest neighbour), the two are mixed by per-position weights, sigmoid of a 1x1 conv over both.
    The result, resized to the teacher's `out_size` if it differs, is this level's residual for the
    next; its 3x3 conv and BN is the output compared with the teacher. (output, residual)."""
    x = batch_norm(F.conv2d(x, params[base + '.conv1']), params, base + '.bn1', mode)
    if residual is not None:
        residual = F.interpolate(residual, size=x.shape[2:], mode='nearest')
        z = torch.sigmoid(F.conv2d(torch.cat([x, residual], 1), params[base + '.att.weight'],
                                   params[base + '.att.bias']))
        x = x * z[:, :1] + residual * z[:, 1:]
    if tuple(x.shape[2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode='nearest')
    return batch_norm(F.conv2d(x, params[base + '.conv2'], padding=1), params, base + '.bn2', mode), x


def review(features, params, base, mode, out_sizes):
    """The student's levels (shallow to deep: its groups, then the pooled feature as a 1x1 map)
    fused from the deepest up, each level seeing all deeper ones through the residual; the outputs
    in the levels' order, each at the teacher's size out_sizes[i]."""
    outputs, residual = [None] * len(features), None
    for i in reversed(range(len(features))):
        outputs[i], residual = abf(features[i], residual, params, f'{base}.abf{i}', mode, out_sizes[i])
    return outputs

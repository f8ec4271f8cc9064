"""The learned parts a run's methods need, built once from the networks' shapes (one forward of
a blank image), and the refusal of a pair of networks that a method cannot compare. The parts
themselves, and the functions that apply them, are in auxiliary.py; the terms that read them in
transfer.py."""
import math

import torch

import auxiliary
from errors import UserError
from losses import ofd_margin
from transfer import AUX_GROUPS, VID_EPS, VID_INITIAL_VARIANCE, feature_options, same_size, with_feature
from utils import bnparams, conv_params, flatten, linear_params, set_requires_grad_except_bn_


def add_aux_params(transfer, params, image_size, train_labels=None):
    """Runs the networks once on a blank image to learn their groups' shapes, then returns
    params with the trainable 'aux.' parameters the active methods need (and CRD's memory of
    the training set whose labels, in dataset order, are `train_labels`)."""
    o = transfer.opt
    dtype = next(v.dtype for v in params.values() if v.is_floating_point())
    x = torch.zeros(1, 3, image_size, image_size, dtype=dtype)
    asked = feature_options(transfer.pooled, transfer.preact)
    with torch.no_grad():
        y_s, g_s, f_s, p_s = with_feature(transfer.f_s(x, params, False, transfer.prefix, **asked))
        _, g_t, f_t, p_t = (with_feature(transfer.f_t(x, params, 'teacher.', **asked)) if transfer.f_t
                            else (None, [], None, None))
    transfer.n_groups = len(g_s)
    if transfer.f_t and len(g_t) != len(g_s):
        raise UserError(f'the student has {len(g_s)} groups and the teacher {len(g_t)}; '
                        f'transfer pairs groups one to one, so both need the same number')
    aux = {}
    if o.factt_beta:
        for g, (s, t) in enumerate(zip(g_s, g_t)):
            same_size(s, t, g, '--factt_beta')
            if s.shape[1] != t.shape[1]:
                aux[f'factt{g}'] = {'conv': conv_params(s.shape[1], t.shape[1], 1)}
    if o.fitnet_beta:
        m = len(g_s) // 2
        if o.fitnet_regressor == 'convreg':
            connectable(g_s[m], g_t[m], m, '--fitnet_beta')
            aux['fitnet'] = auxiliary.convreg_params(g_s[m].shape[1:], g_t[m].shape[1:], always=True)
        else:
            same_size(g_s[m], g_t[m], m, '--fitnet_beta')
            aux['fitnet'] = {'conv': conv_params(g_s[m].shape[1], g_t[m].shape[1], 3)}
    if o.aux_weight:
        for g in AUX_GROUPS:
            c = g_s[g].shape[1]
            aux[f'head{g}'] = {'bn': bnparams(c), 'fc': linear_params(c, y_s.shape[1])}
    aux.update(benchmark_aux_params(o, g_s, f_s, g_t, f_t))
    aux.update(init_stage_aux_params(o, g_s, g_t, p_s, p_t))
    return {**params, **set_requires_grad_except_bn_(flatten(aux, 'aux.')),
            **crd_aux_params(transfer, f_s, f_t, train_labels), **ofd_aux_params(transfer, params, p_s, p_t)}

def ofd_aux_params(transfer, params, p_s, p_t):
    """OFD's connectors and margins (auxiliary.ofd_params). A group's margin is losses.ofd_margin
    of the teacher BN that f_t.bn_before_relu names for it (mdistiller's get_bn_before_relu),
    read once here off the teacher's parameters and kept as a buffer (requires_grad False)."""
    if not transfer.opt.ofd_beta:
        return {}
    names = getattr(transfer.f_t, 'bn_before_relu', None)
    if not names or any(f'teacher.{n}.weight' not in params for n in names):
        raise UserError('--ofd_beta takes its margins from the batch norms before the teacher\'s ReLUs, '
                        'and this teacher has none to read (ShuffleNets, BN-folded ones); pick another '
                        'teacher or drop --ofd_beta')
    for g, (s, t) in enumerate(zip(p_s, p_t)):
        same_size(s, t, g, '--ofd_beta')
    margins = [ofd_margin(params[f'teacher.{n}.weight'], params[f'teacher.{n}.bias']) for n in names]
    aux = set_requires_grad_except_bn_(flatten(auxiliary.ofd_params([s.shape[1] for s in p_s],
                                                                    [t.shape[1] for t in p_t], margins), 'aux.'))
    for k, v in aux.items():
        v.requires_grad_(v.requires_grad and not auxiliary.is_buffer(k))
    return aux

def crd_aux_params(transfer, f_s, f_t, train_labels):
    """'aux.crd.*' (auxiliary.crd_params) for the N training images of `train_labels`:
    embeddings to train, memories and Z to update in the forward (requires_grad False)."""
    o = transfer.opt
    if not o.crd_beta:
        return {}
    n = len(train_labels)
    if o.crd_nce_k > n - 1:
        raise UserError(f'--crd_nce_k {o.crd_nce_k} asks for more negatives per image than the {n} training '
                        f'images hold besides it ({n - 1}); use --crd_nce_k {n - 1} or fewer')
    transfer.crd_classes = auxiliary.crd_classes(train_labels)
    if transfer.crd_classes['most_others'] == 0:
        raise UserError(f'--crd_beta draws its negatives from other classes, and all {n} training images '
                        f'have one label; train on data of two classes or more, or drop --crd_beta')
    crd = flatten({'crd': auxiliary.crd_params(f_s.shape[1], f_t.shape[1], o.crd_feat_dim, n)}, 'aux.')
    for k, v in crd.items():
        v.requires_grad_(k.split('.')[2] not in auxiliary.CRD_BUFFERS)
    return crd

def init_stage_aux_params(opt, g_s, g_t, p_s, p_t):
    """AB's connectors 'ab<g>' from the student's pre-ReLU groups to the teacher's
    (auxiliary.convreg_params), FT's paraphraser of the teacher's last group and translator
    of the student's (RepDistiller's Paraphraser and Translator)."""
    o, aux = opt, {}
    if o.ab_beta:
        for g, (s, t) in enumerate(zip(p_s, p_t)):
            connectable(s, t, g, '--ab_beta')
            aux[f'ab{g}'] = auxiliary.convreg_params(s.shape[1:], t.shape[1:])
    if o.ft_beta:
        c_s, c_t = g_s[-1].shape[1], g_t[-1].shape[1]
        if auxiliary.factor_channels(c_t, o.ft_rate) < 1:
            raise UserError(f'--ft_rate {o.ft_rate:g} gives FT\'s factors no channels from the teacher\'s {c_t}; '
                            f'use a rate of at least {1 / c_t:.3g}, e.g. 0.5')
        aux['ft'] = {'paraphraser': auxiliary.paraphraser_params(c_t, o.ft_rate),
                     'translator': auxiliary.translator_params(c_s, c_t, o.ft_rate)}
    return aux

def benchmark_aux_params(opt, g_s, f_s, g_t, f_t):
    """CC's embeddings (a linear map of each network's pooled feature, RepDistiller's
    LinearEmbed, which does not normalise) and VID's regressors (RepDistiller's VIDLoss: three
    1x1 convolutions with ReLUs between, as many middle channels as the teacher's group, and
    a per-channel log-scale of the predicted variance), ReviewKD's ABF modules (mdistiller's,
    auxiliary.reviewkd_params) from the student's groups and pooled feature to the teacher's
    widths. FSP and KDSVD compare matrices whose sides are the groups' channels, so they need
    the same channel counts in both networks."""
    o, aux = opt, {}
    for flag, name in (('fsp_beta', 'FSP'), ('kdsvd_beta', 'KDSVD')):
        if getattr(o, flag):
            for g, (s, t) in enumerate(zip(g_s, g_t)):
                if s.shape[1] != t.shape[1]:
                    raise UserError(f'--{flag}: {name} compares the groups\' channels one to one, and group {g} '
                                    f'has {s.shape[1]} in the student and {t.shape[1]} in the teacher; pick '
                                    f'networks whose groups have equal widths, or drop --{flag}')
    if o.cc_beta:
        aux['cc'] = {'embed_s': linear_params(f_s.shape[1], o.cc_dim),
                     'embed_t': linear_params(f_t.shape[1], o.cc_dim)}
    if o.vid_beta:
        # softplus(log_scale) + eps is the variance: start it at VID_INITIAL_VARIANCE
        log_scale = math.log(math.expm1(VID_INITIAL_VARIANCE - VID_EPS))
        for g, (s, t) in enumerate(zip(g_s, g_t)):
            c_s, c_t = s.shape[1], t.shape[1]
            aux[f'vid{g}'] = {'conv0': conv_params(c_s, c_t), 'conv1': conv_params(c_t, c_t),
                              'conv2': conv_params(c_t, c_t), 'log_scale': torch.full((c_t,), log_scale)}
    if o.reviewkd_beta:  # one ABF module per student level: each group, then the pooled feature
        aux['reviewkd'] = auxiliary.reviewkd_params([*(s.shape[1] for s in g_s), f_s.shape[1]],
                                                    [*(t.shape[1] for t in g_t), f_t.shape[1]],
                                                    o.reviewkd_mid_channels)
    return aux


def connectable(s, t, g, flag):
    """RepDistiller's ConvReg maps a student group of the teacher's size or larger, or of half
    its size, to the teacher's shape."""
    if s.shape[2] < t.shape[2] and 2 * s.shape[2] != t.shape[2]:
        raise UserError(f'{flag} connects group {g}, which is {tuple(s.shape[2:])} in the student and '
                        f'{tuple(t.shape[2:])} in the teacher; a connector maps a larger group, or one '
                        f'of half the size, to the teacher\'s: pick other networks or drop {flag}')

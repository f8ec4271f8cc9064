"""What a student learns from: the labels, a teacher, and its own auxiliary heads.

`Transfer(opt, f_s, f_t)` computes a batch's loss terms by name, unweighted:

    cross_entropy                 student alone
    distillation                  with a teacher: KD (--alpha, --temperature; plain CE at alpha 0)
    at0, at1, ...                 attention transfer on each group (--beta, --at_p, --at_form); a
                                  larger group is pooled to the other's size (losses.same_resolution)
    grad_at                       gradient-based AT (--grad_beta)
    symmetry                      flip symmetry of the student's input gradient (--sym_beta)
    factt0, factt1, ...           full-activation transfer on each group (--factt_beta)
    fitnet                        FitNets hint on the middle group (--fitnet_beta)
    cos                           cosine between the last groups' pooled features (--cos_beta)
    aux0, aux1                    auxiliary classifiers on groups 0 and 1 (--aux_weight)
    sp, cc, rkd, pkt              SP on the last groups; CC, RKD, PKT on the pooled features (--sp_beta, ...)
    nst0, ..., kdsvd, fsp         NST on each group; KDSVD and FSP over consecutive groups
    vid0, vid1, ...               VID on each group through learned regressors (--vid_beta)
    dkd                           decoupled KD of the logits (--dkd_beta, warmed up over --dkd_warmup)

and `weights(epoch)` says how much each kind counts in that epoch. Keeping the two apart lets
the log report every term on its own scale and lets beta follow a schedule without touching
the (possibly compiled) forward. Methods that need parameters of their own keep them in the
parameter dict under 'aux.': trained and checkpointed with the student, never deployed with it.
"""
import math

import torch
import torch.nn.functional as F

from errors import UserError
from losses import (
    at_least_fp32,
    at_loss,
    at_loss_paper,
    cc_loss,
    cosine_loss,
    distillation,
    dkd_loss,
    feature_distance,
    fsp_loss,
    input_gradient_loss,
    kdsvd_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    same_resolution,
    sp_loss,
    symmetry_loss,
    vid_loss,
)
from losses import input_gradient as input_gradient_of
from utils import batch_norm, bnparams, conv_params, data_parallel, flatten, linear_params, set_requires_grad_except_bn_

BENCHMARK_WEIGHTS = ('sp_beta', 'cc_beta', 'rkd_beta', 'pkt_beta', 'nst_beta', 'kdsvd_beta', 'fsp_beta',
                     'vid_beta', 'dkd_beta')
WEIGHT_FLAGS = ('beta', 'grad_beta', 'sym_beta', 'factt_beta', 'fitnet_beta', 'cos_beta', 'aux_weight',
                *BENCHMARK_WEIGHTS)
NEEDS_TEACHER = ('grad_beta', 'factt_beta', 'fitnet_beta', 'cos_beta', *BENCHMARK_WEIGHTS)
# The settings of those methods, as they enter the loss terms (cohort members may differ in them).
BENCHMARK_SETTINGS = ('cc_dim', 'rkd_w_d', 'rkd_w_a', 'kdsvd_k', 'dkd_alpha', 'dkd_nckd', 'dkd_warmup',
                      'logit_stand')
# RepDistiller's VIDLoss starts each channel's predicted variance at 5.
VID_INITIAL_VARIANCE, VID_EPS = 5.0, 1e-5
POOLED_METHODS = ('cc_beta', 'rkd_beta', 'pkt_beta')  # read the pooled feature, the final layer's input
AUX_GROUPS = (0, 1)


def add_transfer_loss_arguments(p):
    p.add_argument('--at_p', default=2, type=float,
                   help='power p of the attention map sum_c |A_c|^p (the paper compares 1, 2, 4)')
    p.add_argument('--at_form', default='code', choices=['code', 'paper'],
                   help="code: beta * mean squared difference of the normalised maps (the reference "
                        "code's); paper: beta/2 * L2 norm of their difference per sample (eq. 2)")
    p.add_argument('--beta_decay', default=1, type=float,
                   help='multiply --beta by this at each --epoch_step (the AT+KD schedule)')
    p.add_argument('--grad_beta', default=0, type=float,
                   help='gradient-based AT: B/2 * ||J_s - J_t||_2 with J = dCE/d(input)')
    p.add_argument('--sym_beta', default=0, type=float,
                   help="flip symmetry: B/2 * ||J_s - flip(J_s)||_2 on the student's input gradient")
    p.add_argument('--factt_beta', default=0, type=float,
                   help="full-activation transfer: B * mean squared difference of the groups' outputs")
    p.add_argument('--fitnet_beta', default=0, type=float,
                   help="FitNets hint: B * MSE between a 3x3 regressor of the student's middle group "
                        "and the teacher's")
    p.add_argument('--cos_beta', default=0, type=float,
                   help="B * (1 - cosine) between the last groups' pooled features")
    p.add_argument('--aux_weight', default=0, type=float,
                   help='W * cross-entropy of auxiliary heads on groups 0 and 1 (training only)')
    add_benchmark_method_arguments(p)


def add_benchmark_method_arguments(p):
    """The other methods of the CRD benchmark (RepDistiller) and DKD (mdistiller): one weight
    each (0: off), then each method's own settings under its name."""
    p.add_argument('--sp_beta', default=0, type=float,
                   help="similarity-preserving KD: B * SP between the last groups' batch Gram matrices")
    p.add_argument('--cc_beta', default=0, type=float,
                   help='correlation congruence: B * CC between learned embeddings of the pooled features')
    p.add_argument('--cc_dim', default=128, type=int, help="size of CC's linear embeddings (RepDistiller's 128)")
    p.add_argument('--rkd_beta', default=0, type=float,
                   help='relational KD: B * RKD (distance and angle) between the pooled features')
    p.add_argument('--rkd_w_d', default=25, type=float, help="weight of RKD's distance term")
    p.add_argument('--rkd_w_a', default=50, type=float, help="weight of RKD's angle term")
    p.add_argument('--pkt_beta', default=0, type=float,
                   help='probabilistic knowledge transfer: B * PKT between the pooled features')
    p.add_argument('--nst_beta', default=0, type=float,
                   help='neuron selectivity transfer: B * NST (polynomial-kernel MMD) on each group')
    p.add_argument('--kdsvd_beta', default=0, type=float,
                   help="SVD distillation: B * KDSVD over consecutive groups' singular vectors")
    p.add_argument('--kdsvd_k', default=1, type=int, help='singular vectors KDSVD compares per group')
    p.add_argument('--fsp_beta', default=0, type=float,
                   help='flow of solution procedure: B * FSP between consecutive groups')
    p.add_argument('--vid_beta', default=0, type=float,
                   help="variational information distillation: B * VID on each group (learned regressors)")
    p.add_argument('--dkd_beta', default=0, type=float,
                   help='decoupled KD: B * (alpha TCKD + nckd NCKD) at --temperature, warmed up linearly')
    p.add_argument('--dkd_alpha', default=1, type=float, help="DKD's weight of target-class KD (its alpha)")
    p.add_argument('--dkd_nckd', default=8, type=float, help="DKD's weight of non-target-class KD (its beta)")
    p.add_argument('--dkd_warmup', default=20, type=int,
                   help='epochs over which the DKD weight rises linearly to --dkd_beta (0: none)')
    p.add_argument('--logit_stand', action='store_true',
                   help='standardise student and teacher logits (zero mean, unit std) before KD and DKD')


def double_backward(opt):
    """Gradient-based terms differentiate the input gradient: double backprop."""
    return bool(opt.grad_beta or opt.sym_beta)


def step_schedule(value, ratio, epoch, epoch_step):
    """`value` multiplied by `ratio` from each listed epoch on (1-based epochs): a pure function
    of the epoch, so a resumed run needs nothing but the epoch counter."""
    return value * ratio ** sum(epoch >= s for s in epoch_step)


def aux_head(x, params, base, mode):
    """Intermediate supervision: BN-ReLU, global average pool, linear."""
    o = F.relu(batch_norm(x, params, base + '.bn', mode))
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)
    return F.linear(o, params[base + '.fc.weight'], params[base + '.fc.bias'])


def kind(name):
    """'at2' -> 'at': per-group terms share their kind's weight."""
    return name.rstrip('0123456789')


class Transfer:
    """The objective of one batch. f_s(x, params, mode, prefix) and f_t(x, params, prefix) each
    return (logits, [group outputs]), and (logits, groups, pooled feature) when called with
    pooled=True, which only runs whose methods read that feature do; with a teacher, both live in
    one dict under 'student.' and 'teacher.', and the teacher always runs in inference mode
    without parameter gradients."""

    def __init__(self, opt, f_s, f_t=None):
        self.opt, self.f_s, self.f_t = opt, f_s, f_t
        self.prefix = 'student.' if f_t else ''
        self.n_groups = None  # known once add_aux_params has looked at the networks
        # The networks hand out their pooled feature only to the methods that read it.
        self.pooled = bool(f_t) and any(getattr(opt, k) for k in POOLED_METHODS)
        self.replicas = {}  # --ngpu: copies of tensors without gradient on the other GPUs

    def network(self, params, prefix):
        """One network's part of the dict: all that --ngpu needs to copy to its GPUs."""
        if self.opt.ngpu == 1:
            return params
        return {k: v for k, v in params.items() if k.startswith(prefix) and not k.startswith('aux.')}

    def student(self, x, params, mode):
        """(logits, groups, pooled feature or None)."""
        pooled = {'pooled': True} if self.pooled else {}
        return with_feature(data_parallel(lambda x, p, m: self.f_s(x, p, m, self.prefix, **pooled), x,
                                          self.network(params, self.prefix), mode, range(self.opt.ngpu),
                                          self.replicas))

    def teacher(self, x, params, pooled):
        pooled = {'pooled': True} if pooled else {}
        return with_feature(data_parallel(lambda x, p, m: self.f_t(x, p, 'teacher.', **pooled), x,
                                          self.network(params, 'teacher.'), False, range(self.opt.ngpu),
                                          self.replicas))

    def teacher_outputs(self, x, y, params, input_gradient=False, pooled=None):
        """(logits, groups, input gradient or None, pooled feature or None) of the teacher:
        computed once per batch and shared by every student that learns from it (a cohort), so
        `pooled` (default: whether this run needs it) is asked for if any of them does."""
        pooled = self.pooled if pooled is None else pooled
        if not input_gradient:
            with torch.no_grad():
                y_t, g_t, f_t = self.teacher(x, params, pooled)
            return y_t, g_t, None, f_t
        x_t = x.detach().requires_grad_()
        with torch.enable_grad():
            y_t, g_t, f_t = self.teacher(x_t, params, pooled)
            j_t = input_gradient_of(y_t, y, x_t)
        return y_t.detach(), [g.detach() for g in g_t], j_t, None if f_t is None else f_t.detach()

    def __call__(self, x, y, params, mode, teacher=None):
        """(student logits, {term name: unweighted value}). `teacher` holds teacher_outputs()
        of this batch, computed here when not given. Training-only terms (input gradients,
        auxiliary heads) are left out when mode is False."""
        o = self.opt
        input_gradients = mode and double_backward(o)
        if input_gradients:
            x = x.detach().requires_grad_()
        y_s, g_s, f_s = self.student(x, params, mode)
        if self.f_t:
            if teacher is None:
                teacher = self.teacher_outputs(x, y, params, mode and bool(o.grad_beta))
            y_t, g_t, j_t, f_t = teacher
            terms = self.teacher_terms(params, y, y_s, g_s, y_t, g_t)
            terms.update(self.benchmark_terms(params, y, y_s, g_s, f_s, y_t, g_t, f_t))
        else:
            terms, j_t = {'cross_entropy': F.cross_entropy(at_least_fp32(y_s), y)}, None
        if input_gradients:
            j_s = input_gradient_of(y_s, y, x, create_graph=True)  # differentiable: trains the student
            if o.grad_beta:
                terms['grad_at'] = input_gradient_loss(j_s, j_t)
            if o.sym_beta:
                terms['symmetry'] = symmetry_loss(j_s)
        if mode and o.aux_weight:
            for g in AUX_GROUPS:
                logits = aux_head(g_s[g], params, f'aux.head{g}', mode)
                terms[f'aux{g}'] = F.cross_entropy(at_least_fp32(logits), y)
        return y_s, terms

    def teacher_terms(self, params, y, y_s, g_s, y_t, g_t):
        """The terms that compare the student with the teacher."""
        o = self.opt
        terms = {'distillation': distillation(at_least_fp32(y_s), at_least_fp32(y_t), y,
                                              o.temperature, o.alpha, standardize=o.logit_stand)}
        at = at_loss if o.at_form == 'code' else at_loss_paper
        terms.update({f'at{g}': at(s, t, o.at_p) for g, (s, t) in enumerate(zip(g_s, g_t))})
        if o.factt_beta:
            for g, (s, t) in enumerate(zip(g_s, g_t)):
                if f'aux.factt{g}.conv' in params:  # a learned 1x1 map where the widths differ
                    s = F.conv2d(s, params[f'aux.factt{g}.conv'])
                terms[f'factt{g}'] = feature_distance(s, t)
        if o.fitnet_beta:
            m = len(g_s) // 2
            terms['fitnet'] = feature_distance(F.conv2d(g_s[m], params['aux.fitnet.conv'], padding=1), g_t[m])
        if o.cos_beta:
            terms['cos'] = cosine_loss(g_s[-1], g_t[-1])
        return terms

    def benchmark_terms(self, params, y, y_s, g_s, f_s, y_t, g_t, f_t):
        """The terms of the CRD benchmark's other methods and DKD, read as RepDistiller wires
        them: SP the last groups, CC, RKD and PKT the pooled features (CC through learned
        embeddings), NST and VID each group pair, KDSVD and FSP all groups, DKD the logits."""
        o, terms = self.opt, {}
        if o.sp_beta:
            terms['sp'] = sp_loss(g_s[-1], g_t[-1])
        if o.cc_beta:
            terms['cc'] = cc_loss(F.linear(f_s, params['aux.cc.embed_s.weight'], params['aux.cc.embed_s.bias']),
                                  F.linear(f_t, params['aux.cc.embed_t.weight'], params['aux.cc.embed_t.bias']))
        if o.rkd_beta:
            terms['rkd'] = rkd_loss(f_s, f_t, o.rkd_w_d, o.rkd_w_a)
        if o.pkt_beta:
            terms['pkt'] = pkt_loss(f_s, f_t)
        if o.nst_beta:
            terms.update({f'nst{g}': nst_loss(s, t) for g, (s, t) in enumerate(zip(g_s, g_t))})
        if o.kdsvd_beta:
            terms['kdsvd'] = kdsvd_loss(g_s, g_t, o.kdsvd_k)
        if o.fsp_beta:
            terms['fsp'] = fsp_loss(g_s, g_t)
        if o.vid_beta:
            for g, (s, t) in enumerate(zip(g_s, g_t)):
                s, t = same_resolution(s, t)  # RepDistiller pools the larger group first
                terms[f'vid{g}'] = vid_loss(vid_regressor(s, params, f'aux.vid{g}'), t,
                                            params[f'aux.vid{g}.log_scale'], VID_EPS)
        if o.dkd_beta:
            terms['dkd'] = dkd_loss(at_least_fp32(y_s), at_least_fp32(y_t), y, o.dkd_alpha, o.dkd_nckd,
                                    o.temperature, standardize=o.logit_stand)
        return terms

    def term_names(self, training=True):
        """The names __call__ returns, in its order: one meter each."""
        o = self.opt
        names = ['cross_entropy']
        if self.f_t:
            names = ['distillation'] + [f'at{g}' for g in range(self.n_groups)]
            names += [f'factt{g}' for g in range(self.n_groups)] if o.factt_beta else []
            names += ['fitnet'] if o.fitnet_beta else []
            names += ['cos'] if o.cos_beta else []
            names += [n for flag, n in (('sp_beta', 'sp'), ('cc_beta', 'cc'), ('rkd_beta', 'rkd'),
                                        ('pkt_beta', 'pkt')) if getattr(o, flag)]
            names += [f'nst{g}' for g in range(self.n_groups)] if o.nst_beta else []
            names += ['kdsvd'] if o.kdsvd_beta else []
            names += ['fsp'] if o.fsp_beta else []
            names += [f'vid{g}' for g in range(self.n_groups)] if o.vid_beta else []
            names += ['dkd'] if o.dkd_beta else []
        if training:
            names += ['grad_at'] if o.grad_beta else []
            names += ['symmetry'] if o.sym_beta else []
            names += [f'aux{g}' for g in AUX_GROUPS] if o.aux_weight else []
        return names

    def weights(self, epoch, epoch_step):
        """Weight of each kind of term in 1-based `epoch`: beta decays with --beta_decay at the
        learning-rate steps; the paper's forms carry its factor 1/2; DKD warms up (dkd_weight)."""
        o = self.opt
        beta = step_schedule(o.beta, o.beta_decay, epoch, epoch_step)
        weights = {'cross_entropy': 1.0, 'distillation': 1.0,
                   'at': beta if o.at_form == 'code' else beta / 2,
                   'grad_at': o.grad_beta / 2, 'symmetry': o.sym_beta / 2,
                   'factt': o.factt_beta, 'fitnet': o.fitnet_beta, 'cos': o.cos_beta, 'aux': o.aux_weight,
                   **{flag[:-len('_beta')]: getattr(o, flag) for flag in BENCHMARK_WEIGHTS},
                   'dkd': dkd_weight(o.dkd_beta, o.dkd_warmup, epoch)}
        active = {kind(n) for n in self.term_names()}
        return {k: w for k, w in weights.items() if k in active}

    def add_aux_params(self, params, image_size):
        """Runs the networks once on a blank image to learn their groups' shapes, then returns
        params with the trainable 'aux.' parameters the active methods need."""
        o = self.opt
        dtype = next(v.dtype for v in params.values() if v.is_floating_point())
        x = torch.zeros(1, 3, image_size, image_size, dtype=dtype)
        pooled = {'pooled': True} if self.pooled else {}
        with torch.no_grad():
            y_s, g_s, f_s = with_feature(self.f_s(x, params, False, self.prefix, **pooled))
            _, g_t, f_t = with_feature(self.f_t(x, params, 'teacher.', **pooled)) if self.f_t else (None, [], None)
        self.n_groups = len(g_s)
        if self.f_t and len(g_t) != len(g_s):
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
            same_size(g_s[m], g_t[m], m, '--fitnet_beta')
            aux['fitnet'] = {'conv': conv_params(g_s[m].shape[1], g_t[m].shape[1], 3)}
        if o.aux_weight:
            for g in AUX_GROUPS:
                c = g_s[g].shape[1]
                aux[f'head{g}'] = {'bn': bnparams(c), 'fc': linear_params(c, y_s.shape[1])}
        aux.update(self.benchmark_aux_params(g_s, f_s, g_t, f_t))
        return {**params, **set_requires_grad_except_bn_(flatten(aux, 'aux.'))}

    def benchmark_aux_params(self, g_s, f_s, g_t, f_t):
        """CC's embeddings (a linear map of each network's pooled feature, RepDistiller's
        LinearEmbed, which does not normalise) and VID's regressors (RepDistiller's VIDLoss: three
        1x1 convolutions with ReLUs between, as many middle channels as the teacher's group, and
        a per-channel log-scale of the predicted variance). FSP and KDSVD compare matrices whose
        sides are the groups' channels, so they need the same channel counts in both networks."""
        o, aux = self.opt, {}
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
        return aux


def with_feature(outputs):
    """(logits, groups, pooled feature or None): a network asked for its pooled feature
    returns three things, otherwise two."""
    return outputs if len(outputs) == 3 else (*outputs, None)


def dkd_weight(beta, warmup, epoch):
    """mdistiller's warm-up of DKD: beta * min(epoch / warmup, 1) in 1-based `epoch`, a pure
    function of the epoch, so a resumed run goes on where it stopped."""
    return beta * min(epoch / warmup, 1.0) if warmup else beta


def vid_regressor(x, params, base):
    """VID's mean of the teacher's group given the student's: 1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv."""
    o = F.relu(F.conv2d(x, params[base + '.conv0']))
    o = F.relu(F.conv2d(o, params[base + '.conv1']))
    return F.conv2d(o, params[base + '.conv2'])


def same_size(s, t, g, flag):
    if s.shape[2:] != t.shape[2:]:
        raise UserError(f'{flag} compares outputs of group {g}, which are {tuple(s.shape[2:])} in the '
                        f'student and {tuple(t.shape[2:])} in the teacher; pick networks whose '
                        f'groups have the same spatial sizes')

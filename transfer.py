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
    kd                            KD beside the distillation term (--kd_beta: CRD+KD's CE 1, KD 1)
    crd                           contrastive representation distillation of the pooled features
                                  through embeddings and a memory of every training image (--crd_beta)
    ft                            factor transfer of the last groups through a translator and the
                                  paraphraser trained in the init stage (--ft_beta)
    reviewkd                      knowledge review: the student's groups and pooled feature fused by
                                  learned ABF modules against the teacher's pre-ReLU ones (--reviewkd_beta,
                                  warmed up over --reviewkd_warmup)
    ofd                           overhaul of feature distillation: connected pre-ReLU groups against the
                                  teacher's, with margins from its BNs (--ofd_beta)

With an init stage (--init_epochs, `stage='init'`, RepDistiller's init training of AB, FT and
FSP), its steps have terms of their own: ab (the student's connected pre-ReLU groups against
the teacher's activation boundaries), fsp (FSP, which then leaves the main stage) and
reconstruction (the paraphraser's MSE on the teacher's last group).

and `weights(epoch)` says how much each kind counts in that epoch. Keeping the two apart lets
the log report every term on its own scale and lets beta follow a schedule without touching
the (possibly compiled) forward. Methods that need parameters of their own keep them in the
parameter dict under 'aux.': trained and checkpointed with the student, never deployed with it.
"""

import torch
import torch.nn.functional as F

import auxiliary
from errors import UserError
from losses import (
    ab_loss,
    at_least_fp32,
    at_loss,
    at_loss_paper,
    cc_loss,
    cosine_loss,
    crd_loss,
    distillation,
    dkd_loss,
    feature_distance,
    fsp_loss,
    ft_loss,
    hcl_loss,
    input_gradient_loss,
    kdsvd_loss,
    nst_loss,
    ofd_loss,
    pkt_loss,
    rkd_loss,
    same_resolution,
    sp_loss,
    symmetry_loss,
    vid_loss,
)
from losses import input_gradient as input_gradient_of
from utils import batch_norm, data_parallel

BENCHMARK_WEIGHTS = ('sp_beta', 'cc_beta', 'rkd_beta', 'pkt_beta', 'nst_beta', 'kdsvd_beta', 'fsp_beta',
                     'vid_beta', 'dkd_beta', 'reviewkd_beta', 'kd_beta', 'crd_beta', 'ab_beta', 'ft_beta',
                     'ofd_beta')
WEIGHT_FLAGS = ('beta', 'grad_beta', 'sym_beta', 'factt_beta', 'fitnet_beta', 'cos_beta', 'aux_weight',
                *BENCHMARK_WEIGHTS)
NEEDS_TEACHER = ('grad_beta', 'factt_beta', 'fitnet_beta', 'cos_beta', *BENCHMARK_WEIGHTS)
# The settings of those methods, as they enter the loss terms (cohort members may differ in them).
BENCHMARK_SETTINGS = ('fitnet_regressor', 'cc_dim', 'rkd_w_d', 'rkd_w_a', 'kdsvd_k', 'dkd_alpha', 'dkd_nckd',
                      'dkd_warmup', 'logit_stand', 'reviewkd_warmup', 'reviewkd_mid_channels',
                      'crd_feat_dim', 'crd_nce_k', 'crd_nce_t', 'crd_nce_m', 'ft_rate')
# RepDistiller's VIDLoss starts each channel's predicted variance at 5.
VID_INITIAL_VARIANCE, VID_EPS = 5.0, 1e-5
# read the pooled feature, the final layer's input
POOLED_METHODS = ('cc_beta', 'rkd_beta', 'pkt_beta', 'reviewkd_beta', 'crd_beta')
# read the groups' pre-ReLU outputs (the networks' preact=True)
PREACT_METHODS = ('ab_beta', 'ofd_beta', 'reviewkd_beta')  # ReviewKD: the teacher's, as mdistiller
# Methods trained (AB, FSP) or prepared (FT's paraphraser) in an init stage before the main one,
# RepDistiller's --init_epochs, 30 by default.
INIT_METHODS = ('ab_beta', 'ft_beta', 'fsp_beta')
DEFAULT_INIT_EPOCHS = 30
AUX_GROUPS = (0, 1)


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
    pooled=True, which only runs whose methods read that feature do; with preact=True (runs of
    PREACT_METHODS) also the groups' outputs before their ReLUs, and then f.bn_before_relu names
    the BNs that set them. With a teacher, both live in one dict under 'student.' and 'teacher.',
    and the teacher always runs in inference mode without parameter gradients."""

    def __init__(self, opt, f_s, f_t=None):
        self.opt, self.f_s, self.f_t = opt, f_s, f_t
        self.prefix = 'student.' if f_t else ''
        self.n_groups = None  # known once add_aux_params has looked at the networks
        # The networks hand out their pooled feature and pre-ReLU groups only to the methods
        # that read them.
        self.pooled = bool(f_t) and any(getattr(opt, k) for k in POOLED_METHODS)
        self.preact = bool(f_t) and any(getattr(opt, k) for k in PREACT_METHODS)
        # Resolved by options.resolve_init_stage; a namespace built otherwise has no init stage.
        self.init_stage = bool(getattr(opt, 'init_epochs', None))
        self.replicas = {}  # --ngpu: copies of tensors without gradient on the other GPUs
        self.step = 0  # the global step being trained (set by the training step): CRD's draw

    def network(self, params, prefix):
        """One network's part of the dict: all that --ngpu needs to copy to its GPUs."""
        if self.opt.ngpu == 1:
            return params
        return {k: v for k, v in params.items() if k.startswith(prefix) and not k.startswith('aux.')}

    def student(self, x, params, mode):
        """(logits, groups, pooled feature or None, pre-ReLU groups or None)."""
        asked = feature_options(self.pooled, self.preact)
        return with_feature(data_parallel(lambda x, p, m: self.f_s(x, p, m, self.prefix, **asked), x,
                                          self.network(params, self.prefix), mode, range(self.opt.ngpu),
                                          self.replicas))

    def teacher(self, x, params, pooled, preact):
        asked = feature_options(pooled, preact)
        return with_feature(data_parallel(lambda x, p, m: self.f_t(x, p, 'teacher.', **asked), x,
                                          self.network(params, 'teacher.'), False, range(self.opt.ngpu),
                                          self.replicas))

    def teacher_outputs(self, x, y, params, input_gradient=False, pooled=None, preact=None):
        """(logits, groups, input gradient or None, pooled feature or None, pre-ReLU groups or
        None) of the teacher: computed once per batch and shared by every student that learns
        from it (a cohort), so `pooled` and `preact` (default: whether this run needs them) are
        asked for if any of them does."""
        pooled = self.pooled if pooled is None else pooled
        preact = self.preact if preact is None else preact
        if not input_gradient:
            with torch.no_grad():
                y_t, g_t, f_t, p_t = self.teacher(x, params, pooled, preact)
            return y_t, g_t, None, f_t, p_t
        x_t = x.detach().requires_grad_()
        with torch.enable_grad():
            y_t, g_t, f_t, p_t = self.teacher(x_t, params, pooled, preact)
            j_t = input_gradient_of(y_t, y, x_t)
        return (y_t.detach(), [g.detach() for g in g_t], j_t, None if f_t is None else f_t.detach(),
                None if p_t is None else [p.detach() for p in p_t])

    def __call__(self, x, y, params, mode, teacher=None, index=None, stage='main'):
        """(student logits, {term name: unweighted value}). `teacher` holds teacher_outputs()
        of this batch, computed here when not given; `index` the batch's positions in the
        training set (CRD's memory rows). Training-only terms (input gradients, auxiliary heads,
        CRD) are left out when mode is False. `stage` 'init' gives the init-stage terms instead."""
        o = self.opt
        if stage == 'init':
            return self.init_terms(x, y, params, teacher)
        input_gradients = mode and double_backward(o)
        if input_gradients:
            x = x.detach().requires_grad_()
        y_s, g_s, f_s, p_s = self.student(x, params, mode)
        if self.f_t:
            if teacher is None:
                teacher = self.teacher_outputs(x, y, params, mode and bool(o.grad_beta))
            y_t, g_t, j_t, f_t, p_t = teacher
            terms = self.teacher_terms(params, y, y_s, g_s, y_t, g_t, mode)
            terms.update(self.benchmark_terms(params, y, y_s, g_s, f_s, y_t, g_t, f_t, p_s=p_s, p_t=p_t, mode=mode))
            if o.ft_beta:
                terms['ft'] = self.ft_term(params, g_s, g_t, mode)
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
        if mode and o.crd_beta:
            terms['crd'] = self.crd_term(params, y, f_s, f_t, index)
        return y_s, terms

    def teacher_terms(self, params, y, y_s, g_s, y_t, g_t, mode=False):
        """The terms that compare the student with the teacher."""
        o = self.opt
        terms = {'distillation': distillation(at_least_fp32(y_s), at_least_fp32(y_t), y,
                                              o.temperature, o.alpha, standardize=o.logit_stand)}
        if o.kd_beta:  # KD alone (alpha 1): CRD+KD weighs it beside a full cross-entropy
            terms['kd'] = distillation(at_least_fp32(y_s), at_least_fp32(y_t), y, o.temperature, 1.0,
                                       standardize=o.logit_stand)
        at = at_loss if o.at_form == 'code' else at_loss_paper
        terms.update({f'at{g}': at(s, t, o.at_p) for g, (s, t) in enumerate(zip(g_s, g_t))})
        if o.factt_beta:
            for g, (s, t) in enumerate(zip(g_s, g_t)):
                if f'aux.factt{g}.conv' in params:  # a learned 1x1 map where the widths differ
                    s = F.conv2d(s, params[f'aux.factt{g}.conv'])
                terms[f'factt{g}'] = feature_distance(s, t)
        if o.fitnet_beta:
            m = len(g_s) // 2
            if o.fitnet_regressor == 'convreg':  # RepDistiller's hint regressor: conv, BN, ReLU
                hint = F.relu(auxiliary.convreg(g_s[m], params, 'aux.fitnet', mode))
            else:
                hint = F.conv2d(g_s[m], params['aux.fitnet.conv'], padding=1)
            terms['fitnet'] = feature_distance(hint, g_t[m])
        if o.cos_beta:
            terms['cos'] = cosine_loss(g_s[-1], g_t[-1])
        return terms

    def benchmark_terms(self, params, y, y_s, g_s, f_s, y_t, g_t, f_t, p_s=None, p_t=None, *, mode):
        """The terms of the CRD benchmark's other methods and mdistiller's, read as RepDistiller and
        mdistiller wire them: SP the last groups, CC, RKD and PKT the pooled features (CC through
        learned embeddings), NST and VID each group pair, KDSVD and FSP all groups, DKD the logits,
        ReviewKD the groups and pooled features (the teacher's groups pre-ReLU), OFD the pre-ReLU
        groups. `mode` is the student's: the BNs of ReviewKD's and OFD's learned parts follow it."""
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
        if o.fsp_beta and not self.init_stage:
            terms['fsp'] = fsp_loss(g_s, g_t)
        if o.vid_beta:
            for g, (s, t) in enumerate(zip(g_s, g_t)):
                s, t = same_resolution(s, t)  # RepDistiller pools the larger group first
                terms[f'vid{g}'] = vid_loss(vid_regressor(s, params, f'aux.vid{g}'), t,
                                            params[f'aux.vid{g}.log_scale'], VID_EPS)
        if o.dkd_beta:
            terms['dkd'] = dkd_loss(at_least_fp32(y_s), at_least_fp32(y_t), y, o.dkd_alpha, o.dkd_nckd,
                                    o.temperature, standardize=o.logit_stand)
        if o.reviewkd_beta:
            terms['reviewkd'] = reviewkd_term(params, g_s, f_s, p_t, f_t, mode)
        if o.ofd_beta:
            terms['ofd'] = ofd_term(params, p_s, p_t, mode)
        return terms

    def ft_term(self, params, g_s, g_t, mode):
        """FT between the translator's factor of the student's last group and the factor of the
        teacher's by the paraphraser, which the init stage trained and which stays fixed now."""
        with torch.no_grad():
            factor_t = auxiliary.paraphrase(g_t[-1], params, 'aux.ft.paraphraser')
        return ft_loss(auxiliary.translate(g_s[-1], params, 'aux.ft.translator', mode), factor_t)

    def init_terms(self, x, y, params, teacher):
        """(student logits or None, {term: value}) of an init-stage step, RepDistiller's
        helper/pretrain.py: AB trains the student and its connectors to put the connected pre-ReLU
        groups on the teacher's side of each activation boundary, FSP the student to match the
        teacher's FSP matrices, FT its paraphraser alone to reconstruct the teacher's last group
        (the student then does not run). The student runs in training mode."""
        o = self.opt
        if teacher is None:
            teacher = self.teacher_outputs(x, y, params)
        _, g_t, _, _, p_t = teacher
        y_s, terms = None, {}
        if self.student_runs('init'):
            y_s, g_s, _, p_s = self.student(x, params, True)
            if o.ab_beta:
                terms['ab'] = ab_loss([auxiliary.convreg(s, params, f'aux.ab{g}', True) for g, s in enumerate(p_s)],
                                      p_t)
            if o.fsp_beta:
                terms['fsp'] = fsp_loss(g_s, g_t)
        if o.ft_beta:
            reconstruction = auxiliary.reconstruct(auxiliary.paraphrase(g_t[-1], params, 'aux.ft.paraphraser'),
                                                   params, 'aux.ft.paraphraser')
            terms['reconstruction'] = F.mse_loss(at_least_fp32(reconstruction), at_least_fp32(g_t[-1]))
        return y_s, terms

    def student_runs(self, stage):
        """Whether training steps of `stage` run the student (FT's init stage trains its paraphraser only)."""
        return stage == 'main' or bool(self.opt.ab_beta or self.opt.fsp_beta)

    def term_names(self, training=True, stage='main'):
        """The names __call__ returns, in its order: one meter each."""
        o = self.opt
        if stage == 'init':
            return [n for flag, n in (('ab_beta', 'ab'), ('fsp_beta', 'fsp'), ('ft_beta', 'reconstruction'))
                    if getattr(o, flag)]
        names = ['cross_entropy']
        if self.f_t:
            names = ['distillation'] + (['kd'] if o.kd_beta else []) + [f'at{g}' for g in range(self.n_groups)]
            names += [f'factt{g}' for g in range(self.n_groups)] if o.factt_beta else []
            names += ['fitnet'] if o.fitnet_beta else []
            names += ['cos'] if o.cos_beta else []
            names += [n for flag, n in (('sp_beta', 'sp'), ('cc_beta', 'cc'), ('rkd_beta', 'rkd'),
                                        ('pkt_beta', 'pkt')) if getattr(o, flag)]
            names += [f'nst{g}' for g in range(self.n_groups)] if o.nst_beta else []
            names += ['kdsvd'] if o.kdsvd_beta else []
            names += ['fsp'] if o.fsp_beta and not self.init_stage else []
            names += [f'vid{g}' for g in range(self.n_groups)] if o.vid_beta else []
            names += ['dkd'] if o.dkd_beta else []
            names += ['reviewkd'] if o.reviewkd_beta else []
            names += ['ofd'] if o.ofd_beta else []
            names += ['ft'] if o.ft_beta else []
        if training:
            names += ['grad_at'] if o.grad_beta else []
            names += ['symmetry'] if o.sym_beta else []
            names += [f'aux{g}' for g in AUX_GROUPS] if o.aux_weight else []
            names += ['crd'] if o.crd_beta else []
        return names

    def weights(self, epoch, epoch_step, stage='main'):
        """Weight of each kind of term in 1-based `epoch` of `stage`: beta decays with --beta_decay at the
        learning-rate steps; the paper's forms carry its factor 1/2; DKD and ReviewKD warm up (dkd_weight).
        The init stage weighs only its own terms: AB and FSP by their betas, FT's reconstruction by 1
        (RepDistiller's plain MSE); FT's beta weighs its main-stage term."""
        o = self.opt
        if stage == 'init':
            weights = {'ab': o.ab_beta, 'fsp': o.fsp_beta, 'reconstruction': 1.0}
            return {k: w for k, w in weights.items() if k in self.term_names(stage='init')}
        beta = step_schedule(o.beta, o.beta_decay, epoch, epoch_step)
        weights = {'cross_entropy': 1.0, 'distillation': 1.0,
                   'at': beta if o.at_form == 'code' else beta / 2,
                   'grad_at': o.grad_beta / 2, 'symmetry': o.sym_beta / 2,
                   'factt': o.factt_beta, 'fitnet': o.fitnet_beta, 'cos': o.cos_beta, 'aux': o.aux_weight,
                   **{flag[:-len('_beta')]: getattr(o, flag) for flag in BENCHMARK_WEIGHTS},
                   'dkd': dkd_weight(o.dkd_beta, o.dkd_warmup, epoch),
                   'reviewkd': dkd_weight(o.reviewkd_beta, o.reviewkd_warmup, epoch)}
        active = {kind(n) for n in self.term_names()}
        return {k: w for k, w in weights.items() if k in active}

    def add_aux_params(self, params, image_size, train_labels=None):
        """params with the 'aux.' entries the active methods need (aux_params.py), built from
        the networks' shapes; CRD's memory covers the training set of `train_labels`."""
        import aux_params  # it builds on this module's helpers: imported once this one is whole
        return aux_params.add_aux_params(self, params, image_size, train_labels)

    def crd_term(self, params, y, f_s, f_t, index):
        """CRD of this batch: both pooled features embedded, scored against the memories at the
        sample itself and --crd_nce_k negatives drawn for this step (crd_seed), then the batch's
        memory rows moved towards the new embeddings (after the scores, as RepDistiller)."""
        o, n = self.opt, self.crd_classes['n']
        e_s = auxiliary.crd_embed(f_s, params, 'aux.crd.embed_s')
        e_t = auxiliary.crd_embed(f_t, params, 'aux.crd.embed_t')
        generator = torch.Generator(y.device).manual_seed(crd_seed(o.seed, self.step))
        negatives = auxiliary.crd_negatives(self.crd_classes, y, o.crd_nce_k, generator)
        contrast = torch.cat([index[:, None], negatives], 1)
        scores_s, scores_t = auxiliary.crd_scores(e_s, e_t, params, 'aux.crd', contrast, o.crd_nce_t, n)
        auxiliary.crd_update_memory_(e_s.detach(), e_t.detach(), params, 'aux.crd', index, o.crd_nce_m)
        return crd_loss(scores_s, scores_t, n)


def feature_options(pooled, preact):
    """The keyword arguments that ask a network for its pooled feature and pre-ReLU groups: none
    when neither is needed, so that networks without them (the ImageNet ones take no preact)
    run as ever."""
    return {'preact': True} if preact else {'pooled': True} if pooled else {}


def with_feature(outputs):
    """(logits, groups, pooled feature or None, pre-ReLU groups or None): a network returns two
    things, three when asked for its pooled feature, four when asked for its pre-ReLU groups."""
    return (*outputs, *(None,) * (4 - len(outputs)))


def crd_seed(seed, step):
    """The seed of CRD's negatives at 1-based global `step` of a run seeded `seed` (both below
    2**32): a pure function of the step, so a resumed run draws what an uninterrupted one does and
    no generator state is checkpointed."""
    return (seed << 32) + step


def dkd_weight(beta, warmup, epoch):
    """mdistiller's warm-up of DKD (and of ReviewKD, the same rule): beta * min(epoch / warmup, 1)
    in 1-based `epoch`, a pure function of the epoch, so a resumed run goes on where it stopped."""
    return beta * min(epoch / warmup, 1.0) if warmup else beta


def reviewkd_term(params, g_s, f_s, p_t, f_t, mode):
    """mdistiller's ReviewKD: the student's groups and pooled feature (a 1x1 map), fused by the
    ABF modules from the deepest level up (auxiliary.review), against the teacher's pre-ReLU
    groups and pooled feature (mdistiller's preact_feats[1:] + pooled_feat) through HCL."""
    targets = [*p_t, f_t[:, :, None, None]]
    fused = auxiliary.review([*g_s, f_s[:, :, None, None]], params, 'aux.reviewkd', mode,
                             [t.shape[2:] for t in targets])
    return hcl_loss(fused, targets)


def ofd_term(params, p_s, p_t, mode):
    """mdistiller's OFD: each pre-ReLU student group through its connector against the teacher's
    with that group's margin (losses.ofd_loss), group g of n weighted 1 / 2^(n - 1 - g), so the
    last counts fully."""
    n = len(p_s)
    return sum(ofd_loss(auxiliary.connector(s, params, f'aux.ofd{g}', mode), t, params[f'aux.ofd{g}.margin'])
               / 2 ** (n - 1 - g) for g, (s, t) in enumerate(zip(p_s, p_t)))


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

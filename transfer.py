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

and `weights(epoch)` says how much each kind counts in that epoch. Keeping the two apart lets
the log report every term on its own scale and lets beta follow a schedule without touching
the (possibly compiled) forward. Methods that need parameters of their own keep them in the
parameter dict under 'aux.': trained and checkpointed with the student, never deployed with it.
"""
import torch
import torch.nn.functional as F

from errors import UserError
from losses import at_least_fp32, at_loss, at_loss_paper, distillation, \
    input_gradient as input_gradient_of, input_gradient_loss, symmetry_loss, feature_distance, cosine_loss
from utils import batch_norm, bnparams, conv_params, linear_params, flatten, data_parallel, \
    set_requires_grad_except_bn_

WEIGHT_FLAGS = ('beta', 'grad_beta', 'sym_beta', 'factt_beta', 'fitnet_beta', 'cos_beta', 'aux_weight')
NEEDS_TEACHER = ('grad_beta', 'factt_beta', 'fitnet_beta', 'cos_beta')
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
    return (logits, [group outputs]); with a teacher, both live in one dict under 'student.' and
    'teacher.', and the teacher always runs in inference mode without parameter gradients."""

    def __init__(self, opt, f_s, f_t=None):
        self.opt, self.f_s, self.f_t = opt, f_s, f_t
        self.prefix = 'student.' if f_t else ''
        self.n_groups = None  # known once add_aux_params has looked at the networks
        self.replicas = {}  # --ngpu: copies of tensors without gradient on the other GPUs

    def network(self, params, prefix):
        """One network's part of the dict: all that --ngpu needs to copy to its GPUs."""
        if self.opt.ngpu == 1:
            return params
        return {k: v for k, v in params.items() if k.startswith(prefix) and not k.startswith('aux.')}

    def student(self, x, params, mode):
        return data_parallel(lambda x, p, m: self.f_s(x, p, m, self.prefix), x,
                             self.network(params, self.prefix), mode, range(self.opt.ngpu), self.replicas)

    def teacher(self, x, params):
        return data_parallel(lambda x, p, m: self.f_t(x, p, 'teacher.'), x,
                             self.network(params, 'teacher.'), False, range(self.opt.ngpu), self.replicas)

    def teacher_outputs(self, x, y, params, input_gradient=False):
        """(logits, groups, input gradient or None) of the teacher: computed once per batch and
        shared by every student that learns from it (a cohort)."""
        if not input_gradient:
            with torch.no_grad():
                y_t, g_t = self.teacher(x, params)
            return y_t, g_t, None
        x_t = x.detach().requires_grad_()
        with torch.enable_grad():
            y_t, g_t = self.teacher(x_t, params)
            j_t = input_gradient_of(y_t, y, x_t)
        return y_t.detach(), [g.detach() for g in g_t], j_t

    def __call__(self, x, y, params, mode, teacher=None):
        """(student logits, {term name: unweighted value}). `teacher` holds teacher_outputs()
        of this batch, computed here when not given. Training-only terms (input gradients,
        auxiliary heads) are left out when mode is False."""
        o = self.opt
        input_gradients = mode and double_backward(o)
        if input_gradients:
            x = x.detach().requires_grad_()
        y_s, g_s = self.student(x, params, mode)
        if self.f_t:
            if teacher is None:
                teacher = self.teacher_outputs(x, y, params, mode and bool(o.grad_beta))
            terms = self.teacher_terms(params, y, y_s, g_s, *teacher[:2])
            j_t = teacher[2]
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
                                              o.temperature, o.alpha)}
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

    def term_names(self, training=True):
        """The names __call__ returns, in its order: one meter each."""
        o = self.opt
        names = ['cross_entropy']
        if self.f_t:
            names = ['distillation'] + [f'at{g}' for g in range(self.n_groups)]
            names += [f'factt{g}' for g in range(self.n_groups)] if o.factt_beta else []
            names += ['fitnet'] if o.fitnet_beta else []
            names += ['cos'] if o.cos_beta else []
        if training:
            names += ['grad_at'] if o.grad_beta else []
            names += ['symmetry'] if o.sym_beta else []
            names += [f'aux{g}' for g in AUX_GROUPS] if o.aux_weight else []
        return names

    def weights(self, epoch, epoch_step):
        """Weight of each kind of term in 1-based `epoch`: beta decays with --beta_decay at the
        learning-rate steps; the paper's forms carry its factor 1/2."""
        o = self.opt
        beta = step_schedule(o.beta, o.beta_decay, epoch, epoch_step)
        weights = {'cross_entropy': 1.0, 'distillation': 1.0,
                   'at': beta if o.at_form == 'code' else beta / 2,
                   'grad_at': o.grad_beta / 2, 'symmetry': o.sym_beta / 2,
                   'factt': o.factt_beta, 'fitnet': o.fitnet_beta, 'cos': o.cos_beta, 'aux': o.aux_weight}
        active = {kind(n) for n in self.term_names()}
        return {k: w for k, w in weights.items() if k in active}

    def add_aux_params(self, params, image_size):
        """Runs the networks once on a blank image to learn their groups' shapes, then returns
        params with the trainable 'aux.' parameters the active methods need."""
        o = self.opt
        dtype = next(v.dtype for v in params.values() if v.is_floating_point())
        x = torch.zeros(1, 3, image_size, image_size, dtype=dtype)
        with torch.no_grad():
            y_s, g_s = self.f_s(x, params, False, self.prefix)
            g_t = self.f_t(x, params, 'teacher.')[1] if self.f_t else []
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
        return {**params, **set_requires_grad_except_bn_(flatten(aux, 'aux.'))}


def same_size(s, t, g, flag):
    if s.shape[2:] != t.shape[2:]:
        raise UserError(f'{flag} compares outputs of group {g}, which are {tuple(s.shape[2:])} in the '
                        f'student and {tuple(t.shape[2:])} in the teacher; pick networks whose '
                        f'groups have the same spatial sizes')

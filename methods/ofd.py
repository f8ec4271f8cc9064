"""A comprehensive overhaul of feature distillation, OFD (Heo et al., ICCV 2019), as mdistiller
trains it: each pre-ReLU student group through a learned connector (1x1 conv and BN:
'aux.ofd<g>') against the teacher's pre-ReLU group, by a partial L2 that ignores what the
teacher's ReLU hides, with a per-channel margin read off the teacher's batch norm before that
ReLU ('aux.ofd<g>.margin', a fixed buffer):

    ofd_beta * sum_g 2^-(n-1-g) * OFD(connector_g(p_s,g), p_t,g, margin_g)

mdistiller's CIFAR-100 weight: 1e-3, beside a cross-entropy of weight 1 (--alpha 0). The pair's
groups need the same spatial sizes, and the teacher batch norms before its ReLUs (ShuffleNets
and BN-folded teachers have none to read).

The teacher runs in inference mode here, as for every method. mdistiller's OFD puts the whole
distiller, teacher included, in training mode (its comment says the teacher stays in eval mode,
its code does not): the teacher's pre-ReLU groups are normalised by the batch's statistics and
its running statistics move at every step. `--ofd_teacher train` does the same, in a single run
or in a cohort whose members all ask for it (they share one teacher).
"""
import math

import torch

from engine.errors import UserError
from engine.rules import choice
from methods.base import Method, Reference, setting, weight
from methods.formulas import at_least_fp32
from methods.parts import connector, connector_params, same_size


def ofd_margin(bn_weight, bn_bias):
    """The margin (eq. 3): for a pre-ReLU response x ~ N(m, s^2), m and s the teacher BN's shift
    and |scale|, the expectation of x where it is negative, m - s phi(m/s) / Phi(-m/s); -3s where
    Phi(-m/s) <= 0.001 (the response is almost never negative), as mdistiller does. (C,) tensor."""
    s, m = bn_weight.detach().double().abs(), bn_bias.detach().double()
    tail = torch.special.ndtr(-m / s)
    expectation = m - s * torch.exp(-(m / s).pow(2) / 2) / math.sqrt(2 * math.pi) / tail
    return torch.where(tail > 0.001, expectation, -3 * s).to(bn_weight.dtype)


def ofd_loss(source, target, margin):
    """The partial L2 (eq. 4), mdistiller's feat_loss, between the connector's output s and the
    teacher's pre-ReLU group t, with the per-channel margin m: (s - t)^2 where t > 0; where
    m < t <= 0, (s - t)^2 if s > t, else nothing; where t <= m, (s - m)^2 if s > m, else nothing
    (a student below the teacher's negative responses is not pushed up: the ReLU hides them).
    Summed over channels and positions, averaged over the batch."""
    s, t = at_least_fp32(source), at_least_fp32(target)
    m = at_least_fp32(margin).view(1, -1, *[1] * (s.dim() - 2))
    cost = ((s - m).pow(2) * ((s > m) & (t <= m)) + (s - t).pow(2) * ((s > t) & (t > m) & (t <= 0))
            + (s - t).pow(2) * (t > 0))
    return cost.sum() / len(s)


TEACHER_MODES = ('eval', 'train')


class OFD(Method):
    name, title, order = 'ofd', 'OFD', 160
    references = {'ofd': Reference(
        'mdistiller', ('DISTILLER.TYPE', 'OFD', 'OFD.LOSS.CE_WEIGHT', 1.0, 'OFD.LOSS.FEAT_WEIGHT', '{ofd_beta}'),
        parts=((r'aux\.ofd(\d)\.conv', r'distiller.connectors.connectors.\1.0.weight'),
               (r'aux\.ofd(\d)\.bn\.(.*)', r'distiller.connectors.connectors.\1.1.\2'),
               (r'aux\.ofd(\d)\.margin', r'distiller.margins.\1')),
        ours=('--ofd_teacher', 'train'))}
    flags = (weight('ofd_beta', 'overhaul of feature distillation: B * OFD between connected pre-ReLU groups '
                                "(mdistiller's weight: 1e-3, beside a cross-entropy of weight 1: --alpha 0)"),
             setting('ofd_teacher', 'eval', "the teacher's mode: eval (inference, as for every method) or train "
                                            "(as mdistiller's OFD: batch statistics, its running statistics moving)",
                     choice(TEACHER_MODES), choices=TEACHER_MODES, forward=None, teacher_only=True))
    reads = ('preact',)
    buffers = ('margin',)
    examples = {'OFD': {'ofd_beta': 1e-3}}

    def teacher_trains(self, o):
        return bool(o.ofd_beta) and o.ofd_teacher == 'train'

    def refuse_pair(self, o, nets):
        names = getattr(nets.f_t, 'bn_before_relu', None)
        if not names or any(f'teacher.{n}.weight' not in nets.params for n in names):
            raise UserError('--ofd_beta takes its margins from the batch norms before the teacher\'s ReLUs, '
                            'and this teacher has none to read (ShuffleNets, BN-folded ones); pick another '
                            'teacher or drop --ofd_beta')
        for g, (s, t) in enumerate(zip(nets.s.preact, nets.t.preact)):
            same_size(s, t, g, '--ofd_beta')

    def parts(self, o, nets, run):
        """A connector and the margin of the teacher BN that f_t.bn_before_relu names for each group
        (mdistiller's get_bn_before_relu), read once off the teacher's parameters."""
        params = nets.params
        return {f'ofd{g}': {**connector_params(s.shape[1], t.shape[1]),
                            'margin': ofd_margin(params[f'teacher.{n}.weight'], params[f'teacher.{n}.bias'])}
                for g, (s, t, n) in enumerate(zip(nets.s.preact, nets.t.preact, nets.f_t.bn_before_relu))}

    def terms(self, b):
        """Group g of n weighted 1 / 2^(n - 1 - g), so the last counts fully."""
        n = len(b.s.preact)
        return {'ofd': sum(ofd_loss(connector(s, b.params, f'aux.ofd{g}', b.mode), t, b.params[f'aux.ofd{g}.margin'])
                           / 2 ** (n - 1 - g) for g, (s, t) in enumerate(zip(b.s.preact, b.t.preact)))}

    def columns(self, table, teacher, student):
        return {'ofd': {'ofd_beta': 0.001}} if table == 'crd' else {}


METHOD = OFD()

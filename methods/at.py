"""Activation-based attention transfer (Zagoruyko & Komodakis, "Paying More Attention to
Attention", ICLR 2017, arXiv:1612.03928, section 3.1), on every pair of groups:

    beta * sum_g mean((Q_s,g - Q_t,g)^2),   Q = vec(sum_c |A_c|^p) / ||vec(sum_c |A_c|^p)||_2

the reference code's form (`--at_form code`, for which the paper's beta = 1e3 is calibrated), or
eq. 2 as printed, beta/2 * sum_g mean_batch ||Q_s,g - Q_t,g||_2 (`--at_form paper`). The AT
maps of every run with a teacher are computed and logged, at beta 0 too (`at_losses`); beta is
multiplied by --beta_decay at each --epoch_step.
"""
import torch.nn.functional as F

from engine.rules import NUMBER, Rule, choice
from methods.base import KEPT, Method, Reference, setting, step_schedule, weight
from methods.formulas import at_least_fp32, same_resolution


def at(x, p=2):
    """Activation-based attention map: F(A) = sum_c |A_c|^p, flattened and L2-normalised per
    sample (eq. 2 uses Q / ||Q||_2). Taking the channel *mean* instead of the sum only rescales
    Q, which the normalisation removes. The paper compares p = 1, 2, 4."""
    a = at_least_fp32(x)
    a = a.pow(2) if p == 2 else a.abs().pow(p)
    return F.normalize(a.mean(1).flatten(1))


def at_loss(x, y, p=2):
    """Squared difference of the two normalised attention maps, averaged over batch and
    positions: the reference code's form, for which beta = 1e3 in the paper's experiments is
    calibrated (the default). Maps of different sizes meet at the smaller (same_resolution)."""
    x, y = same_resolution(x, y)
    return (at(x, p) - at(y, p)).pow(2).mean()


def at_loss_paper(x, y, p=2):
    """Eq. 2 as printed: || Q_s/||Q_s||_2 - Q_t/||Q_t||_2 ||_2 for each sample, averaged over
    the batch; the paper's beta/2 is applied as the weight."""
    x, y = same_resolution(x, y)
    return (at(x, p) - at(y, p)).norm(dim=1).mean()


class AT(Method):
    name, title, order = 'at', 'AT', 20
    references = {'at': Reference('RepDistiller', ('--distill', 'attention', '-r', 1, '-a', 0, '-b', 1000)),
                  # not a column of RepDistiller's tables; its loop weighs CE, KD and AT as this suite does
                  'at_kd': Reference('RepDistiller', ('--distill', 'attention', '-r', 0.1, '-a', 0.9, '-b', 1000))}
    flags = (
        # Not refused without a teacher: the reference code's runs pass it to students alone too.
        weight('beta', 'weight of the AT terms', needs_teacher=False, forward=None, neutral=KEPT),
        setting('at_p', 2, 'power p of the attention map sum_c |A_c|^p (the paper compares 1, 2, 4)',
                Rule(NUMBER, lambda v: v > 0, 'is not positive', 'the paper uses 1, 2 or 4'), type=float),
        setting('at_form', 'code', "code: beta * mean squared difference of the normalised maps (the reference "
                                   "code's); paper: beta/2 * L2 norm of their difference per sample (eq. 2)",
                choice(['code', 'paper']), choices=['code', 'paper']),
        setting('beta_decay', 1, 'multiply --beta by this at each --epoch_step (the AT+KD schedule)',
                Rule(NUMBER, lambda v: v > 0, 'is not positive', 'use e.g. 0.1, or 1 for no decay'), type=float,
                forward=None),
    )
    per_group = True
    examples = {'AT': {'beta': 1e3}, 'AT, paper form, p = 4': {'beta': 0.2, 'at_form': 'paper', 'at_p': 4},
                'AT+KD': {'alpha': 0.9, 'beta': 1e3, 'beta_decay': 0.2}}

    def active(self, o, has_teacher):
        return has_teacher  # logged at beta 0 too

    def terms(self, b):
        o = b.opt
        loss = at_loss if o.at_form == 'code' else at_loss_paper
        return {f'at{g}': loss(s, t, o.at_p) for g, (s, t) in enumerate(zip(b.s.groups, b.t.groups))}

    def weights(self, o, epoch, epoch_step, stage):
        beta = step_schedule(o.beta, o.beta_decay, epoch, epoch_step)
        return {'at': beta if o.at_form == 'code' else beta / 2}

    def columns(self, table, teacher, student):
        # AT+KD's beta decay in Table 1 is this suite's choice (the paper gives none); RepDistiller's has none
        at_kd = {'beta_decay': 0.2} if table == 'table1' else {'temperature': 4}
        return {'at': {'beta': 1000}, 'at_kd': {'alpha': 0.9, 'beta': 1000, **at_kd}}


METHOD = AT()

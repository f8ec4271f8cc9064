"""Curriculum temperature (CTKD: Li, Li, Yang, Zhao, Song, Luo, Li & Yang, "Curriculum Temperature
for Knowledge Distillation", AAAI 2023, arXiv:2211.16231): the temperature of KD and DKD is learned,
adversarially, instead of fixed by --temperature. One learned scalar p ('aux.ctkd.global_t', the
paper's global temperature, started at 1 as the authors start it) gives

    T = t_min + t_span * sigmoid(p)                      (in (1, 21), 15.6 at the start, by default)

The student descends the run's loss L(theta, T) and the temperature ascends it: a gradient reversal
layer between p and T passes T on unchanged and multiplies the gradient that reaches p by -lambda_e,
so that p's step is that of -lambda_e * L. The reversal strength follows the curriculum, a cosine
rise over the first E epochs (1-based epoch e, the authors' per-epoch schedule):

    lambda_e = lambda_max - (lambda_max - lambda_min) * (1 + cos(pi * min(e, E) / E)) / 2

p is trained by the run's SGD with the student (momentum, weight decay, learning-rate schedule:
the authors add their temperature module to the trainable list of their one optimizer); the
weight decay is not reversed, as theirs is not. Defaults are the authors' CIFAR-100 scripts:
lambda 0 to 1 over 10 epochs (5 on ImageNet), t_min 1, t_span 20 (their --t_start, --t_end).
--temperature is not read with --ctkd. The term 'ctkd' is the temperature in use, logged with
weight 0 (`ctkd_loss`: its mean and std over the epoch's steps), not part of the loss.

The authors also describe an instance-wise temperature, one per sample (released apart from their
repository, whose README shows its per-sample loss), and their code has a linear schedule
(--cosine_decay 0) that their scripts do not use; neither is here.
"""
import math

import torch

import methods
from engine.errors import UserError
from engine.rules import SWITCH_RULE
from methods.base import Method, Reference, at_least_one, not_negative, positive, setting
from methods.dkd import NCKD


def reversal_strength(epoch, lambda_min=0.0, lambda_max=1.0, decay_epochs=10):
    """lambda of 1-based `epoch`: lambda_min at epoch 0, rising along a half cosine to lambda_max at
    epoch decay_epochs and staying there. A pure function of the epoch, so a resumed run goes on
    with the same values."""
    e = min(max(epoch, 0), decay_epochs)
    return lambda_max - (lambda_max - lambda_min) * ((math.cos(e * math.pi / decay_epochs) + 1.0) * 0.5)


def reversed_gradient(x, strength):
    """x in the forward; in the backward, the incoming gradient times -strength (the gradient
    reversal layer of Ganin & Lempitsky, ICML 2015). x - x.detach() is exactly 0: the value is x's."""
    return x.detach() + (x - x.detach()) * -strength


def temperature(p, t_min, t_span):
    return t_min + t_span * torch.sigmoid(p)


def negated(flag):
    """A reference argument: -value of our `flag` (the authors pass the schedule's bounds negated)."""
    return lambda o, nets: repr(0.0 - o[flag])


# The authors' flags for the global temperature and its cosine curriculum.
SCHEDULE = ('--have_mlp', 1, '--mlp_name', 'global', '--t_start', '{ctkd_t_min}', '--t_end', '{ctkd_t_span}',
            '--cosine_decay', 1, '--decay_max', negated('ctkd_lambda_min'), '--decay_min', negated('ctkd_lambda_max'),
            '--decay_loops', '{ctkd_decay_epochs}')
PARTS = ((r'aux\.ctkd\.global_t', 'mlp_net.global_T'),)


class CTKD(Method):
    name, title, order = 'ctkd', 'CTKD', 145
    # The authors' train_student.py: KD as RepDistiller's column, DKD as their script's comment has it
    # (cross-entropy 1, DKD 1, no warm-up).
    references = {
        'ctkd': Reference('CTKD', ('--distill', 'kd', '-r', 0.1, '-a', '{alpha}', '-b', 0, *SCHEDULE), parts=PARTS),
        'ctkd_dkd': Reference('CTKD', ('--distill', 'dkd', '-r', '{ce_weight}', '-a', 0, '-b', '{dkd_beta}',
                                       '--dkd_alpha', '{dkd_alpha}', '--dkd_beta', '{dkd_nckd}', *SCHEDULE),
                              parts=PARTS)}
    flags = (
        setting('ctkd', False, "learn KD's and DKD's temperature adversarially, through gradient reversal (CTKD)",
                SWITCH_RULE, type=bool, needs_teacher=True, teacher_only=True),
        setting('ctkd_lambda_min', 0.0, "CTKD's reversal strength at the start of its curriculum",
                not_negative('use a strength >= 0, e.g. 0'), teacher_only=True),
        setting('ctkd_lambda_max', 1.0, "CTKD's reversal strength from --ctkd_decay_epochs on",
                not_negative('use a strength >= 0, e.g. 1'), teacher_only=True),
        setting('ctkd_decay_epochs', 10, "epochs over which CTKD's reversal strength rises (a half cosine)",
                at_least_one('use the epochs of the rise, e.g. 10 (the authors use 5 on ImageNet)'),
                teacher_only=True),
        setting('ctkd_t_min', 1.0, "CTKD's lowest temperature: T = t_min + t_span * sigmoid(p)",
                positive('a temperature', 1), teacher_only=True),
        setting('ctkd_t_span', 20.0, "the width of CTKD's temperature range, above --ctkd_t_min",
                positive('a width', 20), teacher_only=True),
    )
    compiles = False  # the reversal strength changes with the epoch, which a compiled forward would recompile for
    training_only = True  # the temperature is logged as its training term
    examples = {'CTKD+KD': {'alpha': 0.9, 'ctkd': True}, 'CTKD+DKD': {'dkd_beta': 1, 'dkd_warmup': 0, 'ctkd': True}}

    def refuse(self, o, context):
        if not o.ctkd:
            changed = [f for f in self.flags[1:] if getattr(o, f.name) != f.default]
            if changed:
                f = changed[0]
                raise UserError(f'--{f.name} {getattr(o, f.name):g} sets CTKD, which is off; add --ctkd or drop '
                                f'--{f.name}')
            return
        if o.ctkd_lambda_min > o.ctkd_lambda_max:
            raise UserError(f'--ctkd_lambda_min {o.ctkd_lambda_min:g} is above --ctkd_lambda_max '
                            f'{o.ctkd_lambda_max:g}; the reversal strength rises from the first to the second, '
                            f'e.g. 0 and 1')
        if not any(m.uses_temperature(o) for m in methods.all_methods() if m.active(o, True)):
            raise UserError('--ctkd learns the temperature of KD and DKD, and neither is on; add --alpha 0.9 (KD) '
                            'or --dkd_beta 1 (DKD)')

    def parts(self, o, nets, run):
        return {'ctkd': {'global_t': torch.ones(1)}}

    def temperature(self, b):
        o, p = b.opt, b.params['aux.ctkd.global_t']
        if b.mode:  # training: the temperature ascends the loss that the student descends
            p = reversed_gradient(p, reversal_strength(b.epoch, o.ctkd_lambda_min, o.ctkd_lambda_max,
                                                       o.ctkd_decay_epochs))
        return temperature(p, o.ctkd_t_min, o.ctkd_t_span).reshape(())

    def terms(self, b):
        return {'ctkd': b.temperature.detach()}

    def weights(self, o, epoch, epoch_step, stage):
        return {'ctkd': 0.0}  # the temperature is logged, not optimised as a term

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        return {'ctkd': {'alpha': 0.9, 'ctkd': True},
                'ctkd_dkd': {'dkd_beta': 1, 'dkd_nckd': NCKD.get((teacher, student), 8), 'dkd_warmup': 0,
                             'ctkd': True}}


METHOD = CTKD()

"""Distillation-oriented trainer, DOT (Zhao, Song & Qiu, "DOT: A Distillation-Oriented Trainer",
ICCV 2023, arXiv:2307.08436): not a loss but a way of stepping. The cross-entropy and the
distillation terms of a run are differentiated apart, and each gradient keeps its own momentum:
the task's lighter, the distillation's heavier, so that the distillation loss, which the paper
finds the optimiser neglects once the two conflict, is the one the trajectory follows.

    m_task = 0.9 - delta,   m_kd = 0.9 + delta                         (delta: --dot_delta)
    v_task <- m_task v_task + g_task + wd * theta                      (the cross-entropy's gradient)
    v_kd   <- m_kd   v_kd   + g_kd                                     (every other term's)
    theta  <- theta - lr * v_task - lr * v_kd

A tensor that only one of the two gradients reaches (a method's learned parts, reached by its
term alone) takes that one with the mean momentum (m_task + m_kd) / 2 = 0.9 and the weight decay:
plain SGD. The task is the run's classification term ('cross_entropy', or 'distillation', which
is the cross-entropy with --alpha 0); every other weighted term is distillation. KD goes in as a
term of its own: DOT's KD is mdistiller's, 0.1 * CE + 0.9 * KD at T 4, here `--alpha 0 --ce_weight
0.1 --kd_beta 0.9 --temperature 4 --dot_delta 0.075`.

How a method changes its member's step: Method.optimizer returns the member's optimizer, and an
optimizer with a backward(weighted terms, scale) method takes the step's backward itself (the
training step calls it instead of differentiating the sum). Here it differentiates the
distillation terms first, keeping the graph, sets their gradient aside, then differentiates the
task; step() updates from both. An init stage (FT, AB, FSP) steps as plain SGD: its terms go
through one backward. The distillation gradient is set aside outside autograd's graph, so a
compiled forward (differentiated twice) is not used: DOT's members run theirs eagerly.

The authors' code (mdistiller, `mdistiller/engine/dot.py`) does as written above, with one
difference kept here for parity: at a tensor's first step its distillation momentum starts as the
gradient alone, without the weight decay, where only the distillation reaches it. Its settings:
delta 0.075 on CIFAR-100 (lr 0.05, or 0.01 for ShuffleNet students), 0.09 on ImageNet, with
mdistiller's KD. Under torchrun the set-aside gradient is summed over the processes as the task's is.
"""
import torch

import methods
from engine import distributed
from engine.errors import UserError
from engine.rules import NUMBER, Rule
from methods.base import Method, Reference, setting

MOMENTUM = 0.9  # the suite's SGD momentum, which DOT spreads around
DELTA = 0.075  # the authors' CIFAR-100 configurations (ImageNet: 0.09)
# The terms that are the task: the classification term of a run, by the name it has without a
# teacher and with one (KD's 'distillation' is the cross-entropy when --alpha is 0).
TASK = ('cross_entropy', 'distillation')
# mdistiller's KD, with which the authors train DOT.
KD_DOT = {'alpha': 0, 'ce_weight': 0.1, 'kd_beta': 0.9, 'temperature': 4, 'dot_delta': DELTA}


class DistillationOrientedSGD(torch.optim.Optimizer):
    """SGD with one momentum for the task's gradient and one for the distillation's (see the
    module's docstring). backward() takes the gradients apart; step() then updates."""

    def __init__(self, params, lr, delta, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=MOMENTUM - delta, momentum_kd=MOMENTUM + delta,
                                      weight_decay=weight_decay))
        self.set_aside = {}  # {tensor: the distillation terms' gradient of this step}

    def backward(self, weighted, scale=1.0):
        """Differentiates the step's `weighted` terms ({name: weighted value}), each times `scale`:
        the distillation terms, whose gradient is set aside, then the task."""
        task = [v for n, v in weighted.items() if n in TASK]
        rest = [v for n, v in weighted.items() if n not in TASK]
        self.set_aside = {}
        if rest:
            (sum(rest) * scale).backward(retain_graph=bool(task))
            self.set_aside = {p: p.grad for g in self.param_groups for p in g['params'] if p.grad is not None}
            self.zero_grad(set_to_none=True)
        if task:
            (sum(task) * scale).backward()

    @torch.no_grad()
    def step(self, closure=None):
        kd = self.set_aside
        distributed.reduce_(list(kd.values()))  # the task's gradients were reduced by the training step
        for group in self.param_groups:
            lr, wd = group['lr'], group['weight_decay']
            m_task, m_kd = group['momentum'], group['momentum_kd']
            mean = (m_task + m_kd) / 2
            for p in group['params']:
                state = self.state[p]
                if p.grad is not None:
                    d = p.grad.add(p, alpha=wd) if wd else p.grad
                    buf = state.get('momentum_buffer')
                    if buf is None:
                        state['momentum_buffer'] = buf = d.clone()
                    else:
                        buf.mul_(m_task if p in kd else mean).add_(d)
                    p.add_(buf, alpha=-lr)
                if p in kd:
                    d = kd[p]
                    buf = state.get('momentum_kd_buffer')
                    if buf is None:
                        state['momentum_kd_buffer'] = buf = d.clone()  # the reference's: no weight decay here
                    elif p.grad is not None:
                        buf.mul_(m_kd).add_(d)
                    else:
                        buf.mul_(mean).add_(d.add(p, alpha=wd) if wd else d)
                    p.add_(buf, alpha=-lr)
        self.set_aside = {}


def distills(o):
    """Whether a run with options `o` has a term besides the cross-entropy (KD in --alpha aside)."""
    return any(getattr(o, f) for f in methods.weight_flags() if f not in ('alpha', 'dot_delta'))


class DOT(Method):
    name, title, order = 'dot', 'DOT', 510
    teacher = False  # it steps whatever the run distills, a teacher's terms or DML's peers'
    compiles = False  # its two backward passes run through an eager forward
    references = {'kd_dot': Reference('mdistiller', (
        'DISTILLER.TYPE', 'KD', 'KD.TEMPERATURE', '{temperature}', 'KD.LOSS.CE_WEIGHT', '{ce_weight}',
        'KD.LOSS.KD_WEIGHT', '{kd_beta}', 'SOLVER.TRAINER', 'dot', 'SOLVER.DOT.DELTA', '{dot_delta}'))}
    flags = (
        setting('dot_delta', 0.0, 'distillation-oriented trainer: the cross-entropy\'s gradient steps with momentum '
                                  '0.9 - D and the distillation terms\' with 0.9 + D (the authors: 0.075 on CIFAR, '
                                  '0.09 on ImageNet; 0: off)',
                Rule(NUMBER, lambda v: 0 <= v < 0.1, 'is outside [0, 0.1)',
                     'the momenta are 0.9 - D and 0.9 + D, which must stay below 1; use e.g. 0.075, or 0 for off'),
                forward='on'),
    )
    examples = {'KD + DOT': KD_DOT}

    def active(self, o, has_teacher):
        return bool(o.dot_delta)

    def term_names(self, o, run, stage):
        return []

    def weights(self, o, epoch, epoch_step, stage):
        return {}

    def refuse(self, o, context):
        if not o.dot_delta:
            return
        if o.alpha:
            raise UserError(f'--dot_delta {o.dot_delta:g} steps the cross-entropy and the distillation apart, and '
                            f'--alpha {o.alpha:g} puts both in one term; use --alpha 0 with --kd_beta B (the '
                            f'authors\' KD: --ce_weight 0.1 --kd_beta 0.9)')
        if not distills(o):
            raise UserError(f'--dot_delta {o.dot_delta:g} steps the distillation terms\' gradient apart from the '
                            f'cross-entropy\'s, and this run has none; add one, e.g. --kd_beta 0.9 --ce_weight 0.1, '
                            f'or drop --dot_delta')

    def optimizer(self, o, trainable):
        return DistillationOrientedSGD(trainable, o.lr, o.dot_delta, o.weight_decay) if o.dot_delta else None

    def columns(self, table, teacher, student):
        return {'kd_dot': KD_DOT} if table == 'crd' else {}


METHOD = DOT()

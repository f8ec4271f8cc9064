"""Knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531), the classification
term of every run, with logit standardisation (Sun et al., CVPR 2024).

Without a teacher a run's classification term is the cross-entropy; with one it is

    distillation = alpha * T^2 * KL(softmax(y_t / T) || softmax(y_s / T)) + (1 - alpha) * CE(y_s, labels)

(`--alpha 0`: plain cross-entropy). `--kd_beta B` adds B * KD (alpha 1) as a term of its own
beside the cross-entropy, weighed by `--ce_weight` (1): CRD+KD weighs them so (RepDistiller's -r 1
-a 1). `--logit_stand` z-scores both networks' logits per sample before the temperature, in KD and
in DKD; its authors train KD with it as 0.1 * CE + 9 * KD at T 2 (`--ce_weight 0.1 --kd_beta 9
--temperature 2 --logit_stand`, their configuration's CE_WEIGHT and KD_WEIGHT and their script's
--kd-weight 9 --base-temp 2).
With --ctkd (methods/ctkd.py) T is a learned temperature instead of --temperature.
"""
import torch.nn.functional as F

from engine.errors import UserError
from engine.rules import NUMBER, SWITCH_RULE, Rule
from methods.base import KEPT, Method, Reference, not_negative, positive, setting, weight
from methods.formulas import at_least_fp32


def distillation(y, teacher_scores, labels, T, alpha, standardize=False):
    """alpha * T^2 * KL(softmax(t/T) || softmax(y/T)) + (1 - alpha) * CE(y, labels),
    the KL summed over classes and averaged over the batch. T^2 keeps the soft-target
    gradients on the same scale as the hard-target ones when T changes. standardize=True
    z-scores both logits before the temperature (standardize_logits); the CE keeps the raw
    logits, as in the logit-standardization paper's code."""
    s, t = (standardize_logits(y), standardize_logits(teacher_scores)) if standardize else (y, teacher_scores)
    p = F.log_softmax(s / T, dim=1)
    q = F.softmax(t / T, dim=1)
    kl = F.kl_div(p, q, reduction='sum') * (T ** 2) / y.shape[0]
    return alpha * kl + (1. - alpha) * F.cross_entropy(y, labels)


def standardize_logits(z, eps=1e-7):
    """Logit standardization (Sun et al., CVPR 2024, eq. 9): each sample's logits minus their
    mean, divided by eps + their standard deviation (the unbiased one, torch.std's default, as
    the paper's code takes it), applied before the base temperature."""
    z = at_least_fp32(z)
    return (z - z.mean(1, keepdim=True)) / (eps + z.std(1, keepdim=True))


# KD with logit standardisation as its authors train it on CIFAR-100 (their mdistiller fork's
# configuration: CE_WEIGHT 0.1, KD_WEIGHT 9, T 2, for every pair).
KD_LS = {'kd_beta': 9, 'ce_weight': 0.1, 'temperature': 2, 'logit_stand': True}


class KD(Method):
    name, title, order = 'kd', 'KD', 10
    references = {'kd': Reference('RepDistiller', ('--distill', 'kd', '-r', 0.1, '-a', 0.9, '-b', 0)),
                  # its authors' mdistiller fork, as their train.py sets it with --logit-stand
                  'kd_ls': Reference('logit-standardization-KD', (
                      'DISTILLER.TYPE', 'KD', 'EXPERIMENT.LOGIT_STAND', '{logit_stand}', 'KD.TEMPERATURE',
                      '{temperature}', 'KD.LOSS.CE_WEIGHT', '{ce_weight}', 'KD.LOSS.KD_WEIGHT', '{kd_beta}'))}
    # The flags as the reference code has them: its temperature and alpha first.
    flags = (
        setting('temperature', 4, None, positive('a KD temperature T', 4), type=float, neutral=KEPT, shown=False,
                teacher_only=True),
        setting('alpha', 0, 'weight of the KD term',
                Rule(NUMBER, lambda v: 0 <= v <= 1, 'is outside [0, 1]',
                     'the loss is alpha * KD + (1 - alpha) * cross-entropy; use e.g. 0.9, or 0 for no KD'),
                type=float, weight=True, neutral=KEPT),
        setting('logit_stand', False, 'standardise student and teacher logits (zero mean, unit std) before KD and DKD',
                SWITCH_RULE, type=bool),
        weight('kd_beta', 'B * KD (T^2 KL at --temperature) as a term of its own, beside the cross-entropy '
                          '(needs --alpha 0); CRD+KD as RepDistiller weighs it: --kd_beta 1 --crd_beta 0.8'),
        setting('ce_weight', 1.0, "weight of the cross-entropy where --alpha is 0 (mdistiller's CE_WEIGHT, "
                                  "RepDistiller's -r); KD with standardised logits as its authors train it: "
                                  '--ce_weight 0.1 --kd_beta 9 --temperature 2 --logit_stand',
                not_negative('a weight >= 0, e.g. 0.1'), forward=None),
    )
    weight = 'alpha'
    examples = {'KD': {'alpha': 0.9}, 'KD, standardised logits': {'alpha': 0.9, 'logit_stand': True}}

    def active(self, o, has_teacher):
        return True  # every run has a classification term

    def refuse(self, o, context):
        if o.ce_weight != 1 and o.alpha:
            raise UserError(f'--ce_weight {o.ce_weight:g} weighs the cross-entropy where --alpha is 0; --alpha '
                            f'{o.alpha:g} already weighs it by 1 - alpha; use --alpha 0 with --kd_beta B and '
                            f'--ce_weight G for G * CE + B * KD')
        if o.kd_beta and o.alpha:
            raise UserError(f'--kd_beta {o.kd_beta:g} adds KD as a term of its own, and --alpha {o.alpha:g} puts '
                                f'KD in the distillation term too, which counts it twice; use --alpha 0 with '
                                f'--kd_beta (CRD+KD: --kd_beta 1 --crd_beta 0.8)')

    def term_names(self, o, run, stage):
        if stage != 'main':
            return []
        if not run.has_teacher:
            return ['cross_entropy']
        return ['distillation'] + (['kd'] if o.kd_beta else [])

    def terms(self, b):
        o, y_s = b.opt, at_least_fp32(b.s.logits)
        if b.t is None:
            return {'cross_entropy': F.cross_entropy(y_s, b.y)}
        y_t, T = at_least_fp32(b.t.logits), b.temperature  # --temperature, or a learned one (CTKD)
        terms = {'distillation': distillation(y_s, y_t, b.y, T, o.alpha, standardize=o.logit_stand)}
        if o.kd_beta:  # KD alone (alpha 1)
            terms['kd'] = distillation(y_s, y_t, b.y, T, 1.0, standardize=o.logit_stand)
        return terms

    def uses_temperature(self, o):
        return bool(o.alpha or o.kd_beta)

    def weights(self, o, epoch, epoch_step, stage):
        # With --alpha 0 (which a --ce_weight other than 1 needs) the distillation term is the cross-entropy.
        return {'cross_entropy': o.ce_weight, 'distillation': o.ce_weight, 'kd': o.kd_beta}

    def columns(self, table, teacher, student):
        return {'kd': {'alpha': 0.9, 'temperature': 4},  # the paper's, and RepDistiller's
                **({'kd_ls': KD_LS} if table == 'crd' else {})}


METHOD = KD()

"""Multi-level logit distillation (MLKD: Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR
2023): the student's predictions aligned with the teacher's at three levels, at several
temperatures, on the batch and on a second, strongly augmented view of it (the strong view:
datasets/strong_view.py, FixMatch's RandAugment and Cutout as the authors make it).

With P^T = softmax(z / T) of a batch (B x C) and KL the divergence of each sample's predictions:

    instance(T) = T^2 mean_i KL(P_t^T[i] || P_s^T[i])                      (the samples)
    batch(T)    = || P_t^T P_t^T' - P_s^T P_s^T' ||^2 / B                  (B x B: sample relations)
    class(T)    = || P_t^T' P_t^T - P_s^T' P_s^T ||^2 / C                  (C x C: class relations)

over the temperatures {T0, 3, 5, 2, 6}, T0 = --temperature (4 on CIFAR-100). The terms, as the
authors' KD_ours.py combines them (weak: the batch; strong: its strong view):

    mlkd_ce       = CE(z_s strong, labels)
    mlkd_instance = rho sum_T instance_weak(T) + sum_{T0,3,5} instance_strong(T) + sum_{2,6} instance_weak(T)
    mlkd_batch    = rho sum_T batch_weak(T)
    mlkd_class    = rho_c sum_T class_weak(T)

rho and rho_c are the code's confidence masks: the teacher's confidence in each sample (its top
probability at T 1 on the weak view) and in each class (its probabilities summed over the batch),
each compared with its median (numpy's percentile 50); the code multiplies the batch mean of a term
by the mask and averages, so each masked term is weighed by the share of samples (rho) or classes
(rho_c) at or below the median, about one half, rather than summed over those samples alone. Where
the code differs from the paper's description, this follows the code, which gave the published
numbers: its strong-view sum takes T 2 and 6 on the weak view again (unmasked), and the batch and
class terms of the strong view it computes are not in its loss.

The loss is ce_weight * (CE(weak) + mlkd_ce) + mlkd_beta * (mlkd_instance + mlkd_batch + mlkd_class):
the authors' CE_WEIGHT 0.1 and KD_WEIGHT 0.9 (mdistiller's KD defaults, T 4) on CIFAR-100, for
every pair, no warm-up (their ImageNet configuration: T 1, 0.5 and 0.5). The strong view's
cross-entropy weighs as the batch's: with --alpha A (KD on the batch) it takes ce_weight * (1 - A).
The student runs on the batch, then on its strong view (its batch-norm statistics move twice per
step, as in the authors' trainer); the teacher's forward on the strong view is shared by every
member of a cohort that reads it. --logit_stand z-scores both logits in the instance terms (not in
the masks, the batch or the class terms), as the logit-standardisation authors' MLKD does; they
train it with KD_WEIGHT 9 (6 for vgg13:vgg8, vgg13:MobileNetV2 and resnet32x4:ShuffleV2) at T 2.
"""
import torch
import torch.nn.functional as F

from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32
from methods.kd import standardize_logits

# The temperatures beside T0, in the code's order: the strong view's instance terms take T0 and
# the first two, the weak view's those at the last two.
OTHER_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
# MLKD with logit standardisation: its authors' KD_WEIGHT where it is not 9 (their logs' names).
LS_WEIGHT = {('vgg13', 'vgg8'): 6, ('vgg13', 'MobileNetV2'): 6, ('resnet32x4', 'ShuffleV2'): 6}


def instance_loss(z_s, z_t, T, standardize=False):
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    kl = F.kl_div(F.log_softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1), reduction='none')
    return T ** 2 * kl.sum(1).mean()


def batch_loss(z_s, z_t, T):
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / len(z_s)


def class_loss(z_s, z_t, T):
    p_s, p_t = F.softmax(z_s / T, dim=1), F.softmax(z_t / T, dim=1)
    return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / z_s.shape[1]


def share_at_or_below_median(v):
    """The fraction of v at or below its median (linear interpolation between the middle two)."""
    return (v <= torch.quantile(v, 0.5)).to(v.dtype).mean()


def mlkd_terms(z_s, z_t, z_s_strong, z_t_strong, labels, T0, standardize=False):
    z_s, z_t, z_s_strong, z_t_strong = map(at_least_fp32, (z_s, z_t, z_s_strong, z_t_strong))
    temperatures = (T0, *OTHER_TEMPERATURES)
    p_t = F.softmax(z_t.detach(), dim=1)
    rho = share_at_or_below_median(p_t.max(1).values)
    rho_c = share_at_or_below_median(p_t.sum(0))
    weak = [instance_loss(z_s, z_t, T, standardize) for T in temperatures]
    strong = [instance_loss(z_s_strong, z_t_strong, T, standardize) for T in temperatures[:3]]
    return {'mlkd_ce': F.cross_entropy(z_s_strong, labels),
            'mlkd_instance': rho * sum(weak) + sum(strong) + sum(weak[3:]),
            'mlkd_batch': rho * sum(batch_loss(z_s, z_t, T) for T in temperatures),
            'mlkd_class': rho_c * sum(class_loss(z_s, z_t, T) for T in temperatures)}


class MLKD(Method):
    name, title, order = 'mlkd', 'MLKD', 243
    reads = ('strong_view',)
    training_only = True  # the strong view exists in training steps only
    references = {
        'mlkd': Reference('Multi-Level-Logit-Distillation', (
            'DISTILLER.TYPE', 'KD_ours', 'SOLVER.TRAINER', 'ours', 'KD.TEMPERATURE', '{temperature}',
            'KD.LOSS.CE_WEIGHT', '{ce_weight}', 'KD.LOSS.KD_WEIGHT', '{mlkd_beta}')),
        # the logit-standardisation authors' MLKD, as their train.py sets it with --logit-stand
        'mlkd_ls': Reference('logit-standardization-KD', (
            'DISTILLER.TYPE', 'MLKD', 'SOLVER.TRAINER', 'ours', 'EXPERIMENT.LOGIT_STAND', '{logit_stand}',
            'KD.TEMPERATURE', '{temperature}', 'KD.LOSS.CE_WEIGHT', '{ce_weight}', 'KD.LOSS.KD_WEIGHT',
            '{mlkd_beta}'))}
    flags = (
        weight('mlkd_beta', 'MLKD: B * (instance + batch + class alignment at --temperature and 2, 3, 5, 6, on '
                            'each batch and a strongly augmented view of it, which it also adds a cross-entropy '
                            'of); the authors: 0.9 with --ce_weight 0.1 --temperature 4'),
    )
    examples = {'MLKD': {'mlkd_beta': 0.9, 'ce_weight': 0.1}}

    def term_names(self, o, run, stage):
        return ['mlkd_ce', 'mlkd_instance', 'mlkd_batch', 'mlkd_class'] if stage == 'main' else []

    def terms(self, b):
        o = b.opt
        return mlkd_terms(b.s.logits, b.t.logits, b.s_strong.logits, b.t_strong.logits, b.y, o.temperature,
                          o.logit_stand)

    def weights(self, o, epoch, epoch_step, stage):
        return {'mlkd_ce': o.ce_weight * (1 - o.alpha), 'mlkd_instance': o.mlkd_beta, 'mlkd_batch': o.mlkd_beta,
                'mlkd_class': o.mlkd_beta}

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        return {'mlkd': {'mlkd_beta': 0.9, 'ce_weight': 0.1, 'temperature': 4},
                'mlkd_ls': {'mlkd_beta': LS_WEIGHT.get((teacher, student), 9), 'ce_weight': 0.1, 'temperature': 2,
                            'logit_stand': True}}


METHOD = MLKD()

"""Normalized KD, NKD (Yang, Zeng, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023,
arXiv:2303.13005). KD's loss splits into a target-class term and a non-target term whose two
distributions have different sums; NKD renormalises the non-target classes of both networks
before matching them (eq. 8):

    nkd_beta * ( -mean_i p_t,i[y_i] log p_s,i[y_i]
                 - gamma * T^2 * mean_i sum_{c != y_i} q_t,i,c log q_s,i,c )

p = softmax(z) at temperature 1 in the target term; q = softmax over the classes other than y_i of
z / T, each network's logits without the labelled class at temperature T (--nkd_temperature), so
renormalised over the C - 1 classes left. gamma is --nkd_gamma. The teacher's probabilities carry
no gradient. Beside the cross-entropy of weight 1 (--alpha 0): the authors' distiller adds its NKD
loss to its classifier's loss.

The authors' code is cls_KD (github.com/yzd-v/cls_KD, on mmcls), whose NKDLoss computes the
same. Its defaults, the flags' here (T 1, gamma 1.5), are those of its ImageNet configurations;
its one CIFAR-100 configuration (resnet34 -> resnet18) takes T 3, gamma 3.5, which the benchmark
column takes for every pair (the paper's per-pair CIFAR-100 settings are not in the repository).

The teacher runs in inference mode here, as for every method. The authors' training loop
(mmengine's) puts their whole distiller in training mode at every epoch, teacher included, so
their teacher normalises each batch by its own statistics and its running statistics move;
`--nkd_teacher train` does the same, in a single run or in a cohort whose members all ask for it.
"""
import torch.nn.functional as F

from engine.rules import choice
from methods.base import Method, Reference, not_negative, positive, setting, weight
from methods.formulas import at_least_fp32

TEACHER_MODES = ('eval', 'train')


def nkd_loss(y_s, y_t, labels, gamma=1.5, T=1.0):
    """The target term (temperature 1) plus gamma * T^2 times the cross-entropy between the
    networks' renormalised non-target distributions at temperature T, both averaged over the batch."""
    z_s, z_t = at_least_fp32(y_s), at_least_fp32(y_t).detach()
    target = F.one_hot(labels, z_s.shape[1]).bool()
    s_target = F.log_softmax(z_s, 1).gather(1, labels[:, None])
    t_target = F.softmax(z_t, 1).gather(1, labels[:, None])
    target_term = -(t_target * s_target).mean()
    # -inf leaves the labelled class out of both softmaxes; its product is then set to 0.
    log_s = F.log_softmax(z_s.masked_fill(target, float('-inf')) / T, 1)
    q_t = F.softmax(z_t.masked_fill(target, float('-inf')) / T, 1)
    non_target = (q_t * log_s).masked_fill(target, 0).sum(1).mean()
    return target_term - gamma * T ** 2 * non_target


class NKD(Method):
    name, title, order = 'nkd', 'NKD', 237
    # cls_KD's NKDLoss, trained as its ClassificationDistiller and mmengine's loop train it.
    references = {'nkd': Reference('cls_KD', ('NKDLoss', 'temp', '{nkd_temperature}', 'gamma', '{nkd_gamma}'),
                                   ours=('--nkd_teacher', 'train'))}
    flags = (
        weight('nkd_beta', "normalized KD: B * (target-class term + gamma T^2 renormalised non-target term; "
                           "the authors' weight: 1)"),
        setting('nkd_gamma', 1.5, "NKD's weight of its non-target term (the paper's gamma; the authors' ImageNet 1.5, "
                                  'CIFAR-100 3.5)', not_negative('use 0 (off) or a positive weight, e.g. 1.5'),
                type=float),
        setting('nkd_temperature', 1.0, "NKD's temperature of its non-target term (the paper's lambda; the authors' "
                                        'ImageNet 1, CIFAR-100 3)', positive("NKD's temperature", 1), type=float),
        setting('nkd_teacher', 'eval', "the teacher's mode: eval (inference, as for every method) or train (as the "
                                       "authors' loop: batch statistics, its running statistics moving)",
                choice(TEACHER_MODES), choices=TEACHER_MODES, forward=None, teacher_only=True),
    )
    examples = {'NKD': {'nkd_beta': 1}}

    def teacher_trains(self, o):
        return bool(o.nkd_beta) and o.nkd_teacher == 'train'

    def terms(self, b):
        o = b.opt
        return {'nkd': nkd_loss(b.s.logits, b.t.logits, b.y, o.nkd_gamma, o.nkd_temperature)}

    def columns(self, table, teacher, student):
        return {'nkd': {'nkd_beta': 1, 'nkd_gamma': 3.5, 'nkd_temperature': 3}} if table == 'crd' else {}


METHOD = NKD()

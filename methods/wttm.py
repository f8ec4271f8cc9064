"""Weighted transformed teacher matching, WTTM (Zheng & Yang, "Knowledge Distillation Based on
Transformed Teacher Matching", ICLR 2024, arXiv:2402.11148): the student, at temperature 1, matches
the teacher's probabilities raised to the power gamma (a temperature 1/gamma on the teacher's side
alone, eq. 4), each sample weighted by how smooth that transformed teacher is (eq. 16):

    wttm_beta * mean_i U_i * KL(q_i || softmax(y_s,i))
    q_i = p_t,i^gamma / U_i,   U_i = sum_c p_t,i,c^gamma,   p_t = softmax(y_t)

beside the cross-entropy (weight 1, --alpha 0). U_i is the power sum of the teacher's distribution
(1 for a one-hot teacher, C^(1-gamma) for a uniform one), so flatter teachers weigh more; without it
(U = 1) the term is the paper's TTM. U_i carries no gradient (it is the teacher's), and
U_i * KL = sum_c p_t,c^gamma (log q_c - log p_s,c) is computed here in log space, so that a
teacher probability that underflows does not turn into log 0.

The authors' code is a RepDistiller fork (github.com/zkxufo/TTM: `train_student.py --distill wttm
--ttm_l GAMMA -r 1 -a 0 -b BETA`), whose WTTM loss computes the same. Their paper lists the per-pair
gamma and beta in its appendix A.4, not reproduced here; the benchmark column takes the one WTTM
setting of the authors' README (gamma 0.2, weight 4, there beside CRD) for every pair, and those are
the flags' defaults.
"""
import torch.nn.functional as F

from methods.base import Method, Reference, positive, setting, weight
from methods.formulas import at_least_fp32

GAMMA, BETA = 0.2, 4  # the authors' README (its WTTM + CRD example: --ttm_l 0.2 -a 4)


def wttm_loss(y_s, y_t, gamma=GAMMA):
    """mean over the batch of U * KL(p_t^gamma / U || softmax(y_s)), U = sum_c p_t,c^gamma."""
    log_p_s = F.log_softmax(at_least_fp32(y_s), dim=1)
    log_power = gamma * F.log_softmax(at_least_fp32(y_t), dim=1)  # log p_t^gamma
    log_q = log_power - log_power.logsumexp(1, keepdim=True)
    return (log_power.exp() * (log_q - log_p_s)).sum(1).mean()


class WTTM(Method):
    name, title, order = 'wttm', 'WTTM', 234
    references = {'wttm': Reference('TTM', ('--distill', 'wttm', '--ttm_l', '{wttm_gamma}', '-r', 1, '-a', 0,
                                            '-b', '{wttm_beta}'))}
    flags = (
        weight('wttm_beta', 'weighted transformed teacher matching: B * mean U * KL(p_t^gamma / U || softmax(y_s)), '
                            "U = sum p_t^gamma (the authors' README: 4)"),
        setting('wttm_gamma', GAMMA, "WTTM's power of the teacher's probabilities (the paper's gamma, 1 / its "
                                     "teacher temperature; the authors' README: 0.2)",
                positive("WTTM's gamma", GAMMA), type=float),
    )
    examples = {'WTTM': {'wttm_beta': BETA}}

    def terms(self, b):
        return {'wttm': wttm_loss(b.s.logits, b.t.logits, b.opt.wttm_gamma)}

    def columns(self, table, teacher, student):
        return {'wttm': {'wttm_beta': BETA, 'wttm_gamma': GAMMA}} if table == 'crd' else {}


METHOD = WTTM()

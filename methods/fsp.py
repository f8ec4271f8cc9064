"""Flow of solution procedure (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017), as
RepDistiller computes and trains it: the FSP matrix G_ij = sum over positions of a_i b_j / (h w)
between each group and the next (eq. 1, the larger map pooled to the smaller), and

    fsp_beta * sum_(g, g+1) mean((G_s - G_t)^2)

(RepDistiller averages where the paper sums, and weighs the pairs equally). RepDistiller trains it
in an init stage before the main one (--init_epochs, 30 by default), whose loss it is alone;
the main stage then has no FSP term. With --init_epochs 0 it is a main-stage term. Student and
teacher groups need equal channel counts.
"""
from methods.base import Method, weight
from methods.formulas import at_least_fp32, same_resolution
from methods.parts import equal_widths


def fsp_matrix(a, b):
    """(B, C_a, C_b); the larger map pooled to the smaller (same_resolution)."""
    a, b = same_resolution(a, b)
    a, b = at_least_fp32(a).flatten(2), at_least_fp32(b).flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(groups_s, groups_t):
    return sum((fsp_matrix(s0, s1) - fsp_matrix(t0, t1)).pow(2).mean()
               for s0, s1, t0, t1 in zip(groups_s, groups_s[1:], groups_t, groups_t[1:]))


class FSP(Method):
    name, title, order = 'fsp', 'FSP', 120
    flags = (weight('fsp_beta', 'flow of solution procedure: B * FSP between consecutive groups, trained in the '
                                'init stage (--init_epochs 0: a main-stage term)'),)
    init_stage = 'trains'
    examples = {'FSP': {'fsp_beta': 1}}

    def refuse_pair(self, o, nets):
        equal_widths(nets.s.groups, nets.t.groups, 'fsp_beta', 'FSP')

    def term_names(self, o, run, stage):
        return ['fsp'] if stage == 'init' or not run.init_stage else []

    def terms(self, b):
        return {} if b.run.init_stage else {'fsp': fsp_loss(b.s.groups, b.t.groups)}

    def init_terms(self, b):
        return {'fsp': fsp_loss(b.s.groups, b.t.groups)}

    def columns(self, table, teacher, student):
        return {'fsp': {'fsp_beta': 1}} if table == 'crd' else {}


METHOD = FSP()

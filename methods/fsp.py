"""Flow of solution procedure (Yim et al., "A Gift from Knowledge Distillation", CVPR 2017), as
RepDistiller computes and trains it: the FSP matrix G_ij = sum over positions of a_i b_j / (h w)
between each feature map and the next (eq. 1, the larger map pooled to the smaller), and

    fsp_beta * sum_(l, l+1) mean((G_s - G_t)^2)

over the maps (stem, group 0, group 1, ...): the stem's output (the layers before the first
group; RepDistiller's feat[0]) and every group's, so a network of three groups gives three pairs.
RepDistiller averages where the paper sums, and weighs the pairs equally. It trains FSP in an
init stage before the main one (--init_epochs, 30 by default), whose loss it is alone; the main
stage then has no FSP term. With --init_epochs 0 it is a main-stage term. Student and teacher
maps need equal channel counts.
"""
from engine.errors import UserError
from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32, same_resolution
from methods.parts import equal_widths


def fsp_matrix(a, b):
    """(B, C_a, C_b); the larger map pooled to the smaller (same_resolution)."""
    a, b = same_resolution(a, b)
    a, b = at_least_fp32(a).flatten(2), at_least_fp32(b).flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(maps_s, maps_t):
    return sum((fsp_matrix(s0, s1) - fsp_matrix(t0, t1)).pow(2).mean()
               for s0, s1, t0, t1 in zip(maps_s, maps_s[1:], maps_t, maps_t[1:]))


def maps(outputs):
    return [outputs.stem, *outputs.groups]


class FSP(Method):
    name, title, order = 'fsp', 'FSP', 120
    # RepDistiller's script passes -b 50, which its FSP never reads (the init stage's loss is
    # unweighted there, and its main stage has no FSP term): the trajectory is --fsp_beta 1's.
    references = {'fsp': Reference('RepDistiller', ('--distill', 'fsp', '-r', 1, '-a', 0, '-b', 50), init=True)}
    flags = (weight('fsp_beta', 'flow of solution procedure: B * FSP between consecutive maps (the stem, then the '
                                'groups), trained in the init stage (--init_epochs 0: a main-stage term)'),)
    reads = ('stem',)
    init_stage = 'trains'
    examples = {'FSP': {'fsp_beta': 1}}

    def refuse(self, o, context):
        # A user of RepDistiller's script passes -b 50, which there changes nothing; here it would
        # multiply the init stage's only term, and so its step, by 50.
        if o.fsp_beta not in (0, 1) and o.init_epochs != 0:
            raise UserError(f'--fsp_beta {o.fsp_beta:g} would weigh the init stage, whose FSP loss RepDistiller '
                            f'trains unweighted (its FSP never reads -b, so its script\'s -b 50 means nothing); use '
                            f'--fsp_beta 1 (--init_lr sets that stage\'s step), or --init_epochs 0 for a weighted '
                            f'main-stage term')

    def refuse_pair(self, o, nets):
        equal_widths(nets.s.groups, nets.t.groups, 'fsp_beta', 'FSP', nets.s.stem, nets.t.stem)

    def term_names(self, o, run, stage):
        return ['fsp'] if stage == 'init' or not run.init_stage else []

    def terms(self, b):
        return {} if b.run.init_stage else {'fsp': fsp_loss(maps(b.s), maps(b.t))}

    def init_terms(self, b):
        return {'fsp': fsp_loss(maps(b.s), maps(b.t))}

    def columns(self, table, teacher, student):
        return {'fsp': {'fsp_beta': 1}} if table == 'crd' else {}


METHOD = FSP()

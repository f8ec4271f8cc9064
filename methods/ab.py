"""Activation boundaries, AB (Heo et al., "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019), as RepDistiller trains it: in an init stage
(--init_epochs, 30 by default) only, the student's pre-ReLU groups, through learned connectors
('aux.ab<g>': RepDistiller's Connector, nothing where the shapes match), are pushed to the
teacher's side of each of its neurons' activation boundaries:

    ab_beta * 3/1000 * sum_g 2^-(n-1-g) * sum [(s + m)^2 (s > -m, t <= 0) + (s - m)^2 (s <= m, t > 0)] / b

with margin m = 1 (eq. 5-6; RepDistiller's factor 3/1000 kept, so that its weight 1 applies). The
main stage has no AB term.
"""
from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32
from methods.parts import connectable, convreg, convreg_params


def ab_loss(groups_s, groups_t, margin=1.0):
    """groups_s: the student's groups mapped by connectors to the teacher's shape; groups_t: the
    teacher's pre-ReLU groups. Each group's cost is summed, divided by the batch size and
    weighted 2^-(n-1-i) (the last group counts fully)."""
    n, total = len(groups_s), 0
    for i, (s, t) in enumerate(zip(groups_s, groups_t)):
        s, t = at_least_fp32(s), at_least_fp32(t)
        cost = (s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0))
        total = total + 2. ** (i - n + 1) * cost.sum() / len(s)
    return total * 3 / 1000


class AB(Method):
    name, title, order = 'ab', 'AB', 115
    # Its pairs of equal shapes only: the connectors of other pairs are not mapped to RepDistiller's yet.
    # Its Connector: a ConvReg per group whose shape differs ('conv' whatever its kind), none elsewhere;
    # the init stage trains it in init_modules, the main stage keeps it as module_list's second entry.
    references = {'ab': Reference(
        'RepDistiller', ('--distill', 'abound', '-r', 1, '-a', 0, '-b', 1), init=True,
        parts=((r'aux\.ab(\d)\.(?:conv|down|up)\.(weight|bias)', r'module_list.1.connectors.\1.conv.\2'),
               (r'aux\.ab(\d)\.bn\.(.*)', r'module_list.1.connectors.\1.bn.\2')),
        init_parts=((r'aux\.ab(\d)\.(?:conv|down|up)\.(weight|bias)', r'init_modules.0.connectors.\1.conv.\2'),
                    (r'aux\.ab(\d)\.bn\.(.*)', r'init_modules.0.connectors.\1.bn.\2')))}
    flags = (weight('ab_beta', "activation boundaries: B * AB between the student's pre-ReLU groups, through learned "
                               "connectors, and the teacher's, in the init stage only (RepDistiller's weight: 1)"),)
    reads = ('preact',)
    init_stage = 'trains'
    init_only = True
    examples = {}  # its whole training is an init stage, which the cost benchmark does not time

    def refuse_pair(self, o, nets):
        for g, (s, t) in enumerate(zip(nets.s.preact, nets.t.preact)):
            connectable(s, t, g, '--ab_beta')

    def parts(self, o, nets, run):
        return {f'ab{g}': convreg_params(s.shape[1:], t.shape[1:]) for g, (s, t) in enumerate(zip(nets.s.preact,
                                                                                               nets.t.preact))}

    def term_names(self, o, run, stage):
        return ['ab'] if stage == 'init' else []

    def init_terms(self, b):
        return {'ab': ab_loss([convreg(s, b.params, f'aux.ab{g}', True) for g, s in enumerate(b.s.preact)],
                              b.t.preact)}

    def columns(self, table, teacher, student):
        return {'ab': {'ab_beta': 1}} if table == 'crd' else {}


METHOD = AB()

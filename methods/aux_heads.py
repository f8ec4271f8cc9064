"""Auxiliary heads: intermediate supervision of the student's groups 0 and 1, each through a head
of its own (BN, ReLU, global average pool, linear: 'aux.head<g>'),

    aux_weight * (CE(head_0(g_0), labels) + CE(head_1(g_1), labels))

in training steps only, with or without a teacher.
"""
import torch.nn.functional as F

from methods.base import Method, weight
from methods.formulas import at_least_fp32
from utils import batch_norm, bnparams, linear_params

GROUPS = (0, 1)


def aux_head(x, params, base, mode):
    """Intermediate supervision: BN-ReLU, global average pool, linear."""
    o = F.relu(batch_norm(x, params, base + '.bn', mode))
    o = F.adaptive_avg_pool2d(o, 1).flatten(1)
    return F.linear(o, params[base + '.fc.weight'], params[base + '.fc.bias'])


class AuxHeads(Method):
    name, title, order = 'aux', 'auxiliary heads', 200
    flags = (weight('aux_weight', 'W * cross-entropy of auxiliary heads on groups 0 and 1 (training only)',
                    needs_teacher=False),)
    teacher = False
    training_only = True
    examples = {'auxiliary heads': {'aux_weight': 0.3}}

    def parts(self, o, nets, run):
        num_classes = nets.s.logits.shape[1]
        return {f'head{g}': {'bn': bnparams(nets.s.groups[g].shape[1]),
                             'fc': linear_params(nets.s.groups[g].shape[1], num_classes)} for g in GROUPS}

    def term_names(self, o, run, stage):
        return [f'aux{g}' for g in GROUPS] if stage == 'main' else []

    def terms(self, b):
        return {f'aux{g}': F.cross_entropy(at_least_fp32(aux_head(b.s.groups[g], b.params, f'aux.head{g}', b.mode)),
                                           b.y) for g in GROUPS}


METHOD = AuxHeads()

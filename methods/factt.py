"""Full-activation transfer, F-ActT (Zagoruyko & Komodakis, ICLR 2017, Table 1's baseline): each
group's output compared in full,

    factt_beta * sum_g mean((r_g(g_s) - g_t)^2)

where r_g is a learned 1x1 convolution ('aux.factt<g>.conv') from the student's channels to the
teacher's, present only where the widths differ. Groups of other spatial sizes are refused.
"""
import torch.nn.functional as F

from methods.base import Method, weight
from methods.formulas import feature_distance
from methods.parts import same_size
from utils import conv_params


class FActT(Method):
    name, title, order = 'factt', 'F-ActT', 30
    flags = (weight('factt_beta', "full-activation transfer: B * mean squared difference of the groups' outputs"),)
    per_group = True
    examples = {'F-ActT': {'factt_beta': 1}}

    def columns(self, table, teacher, student):
        return {'factt': {'factt_beta': 1}} if table == 'table1' else {}  # a weight of this suite's choice

    def parts(self, o, nets, run):
        parts = {}
        for g, (s, t) in enumerate(zip(nets.s.groups, nets.t.groups)):
            same_size(s, t, g, '--factt_beta')
            if s.shape[1] != t.shape[1]:
                parts[f'factt{g}'] = {'conv': conv_params(s.shape[1], t.shape[1], 1)}
        return parts

    def terms(self, b):
        terms = {}
        for g, (s, t) in enumerate(zip(b.s.groups, b.t.groups)):
            if f'aux.factt{g}.conv' in b.params:
                s = F.conv2d(s, b.params[f'aux.factt{g}.conv'])
            terms[f'factt{g}'] = feature_distance(s, t)
        return terms


METHOD = FActT()

"""Neuron selectivity transfer (Huang & Wang 2017, eq. 5-6, polynomial kernel k(x, y) = (x^T y)^2)
on each pair of groups: the squared MMD between the sets of channel maps, each flattened and
L2-normalised over positions,

    nst_beta * sum_g (mean k(t, t') + mean k(s, s') - 2 mean k(s, t))

the means over all channel pairs and the batch; maps of different sizes meet at the smaller, as
in RepDistiller. RepDistiller's weight: 50.
"""
import torch.nn.functional as F

from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32, same_resolution


def nst_loss(f_s, f_t):
    f_s, f_t = same_resolution(f_s, f_t)
    s = F.normalize(at_least_fp32(f_s).flatten(2), dim=2)
    t = F.normalize(at_least_fp32(f_t).flatten(2), dim=2)

    def kernel(a, b):
        return (a @ b.transpose(1, 2)).pow(2).mean()
    return kernel(t, t).detach() + kernel(s, s) - 2 * kernel(s, t)


class NST(Method):
    name, title, order = 'nst', 'NST', 100
    references = {'nst': Reference('RepDistiller', ('--distill', 'nst', '-r', 1, '-a', 0, '-b', 50))}
    flags = (weight('nst_beta', 'neuron selectivity transfer: B * NST (polynomial-kernel MMD) on each group'),)
    per_group = True
    examples = {'NST': {'nst_beta': 50}}

    def terms(self, b):
        return {f'nst{g}': nst_loss(s, t) for g, (s, t) in enumerate(zip(b.s.groups, b.t.groups))}

    def columns(self, table, teacher, student):
        return {'nst': {'nst_beta': 50}} if table == 'crd' else {}


METHOD = NST()

"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, eq. 9-10, cosine kernel) on the
pooled features: each network's cosine similarities between the batch's samples, shifted to
[0, 1] and normalised to a conditional distribution p(j | i) per row,

    pkt_beta * mean_ij p_t(j|i) log(p_t(j|i) / p_s(j|i))

a mean over the b^2 entries, not a sum, as the authors' code. RepDistiller's weight: 30000.
"""
import torch

from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32


def pkt_loss(e_s, e_t, eps=1e-7):
    def conditional(e):
        e = at_least_fp32(e)
        e = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
        k = (e @ e.T + 1) / 2
        return k / k.sum(1, keepdim=True)
    p_s, p_t = conditional(e_s), conditional(e_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(Method):
    name, title, order = 'pkt', 'PKT', 90
    references = {'pkt': Reference('RepDistiller', ('--distill', 'pkt', '-r', 1, '-a', 0, '-b', 30000))}
    flags = (weight('pkt_beta', 'probabilistic knowledge transfer: B * PKT between the pooled features'),)
    reads = ('pooled',)
    examples = {'PKT': {'pkt_beta': 30000}}

    def terms(self, b):
        return {'pkt': pkt_loss(b.s.pooled, b.t.pooled)}

    def columns(self, table, teacher, student):
        return {'pkt': {'pkt_beta': 30000}} if table == 'crd' else {}


METHOD = PKT()

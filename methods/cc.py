"""Correlation congruence (Peng et al., ICCV 2019) in its authors' code, as RepDistiller runs it:
both pooled features are embedded by learned linear maps (RepDistiller's LinearEmbed, no
normalisation: 'aux.cc.embed_s', 'aux.cc.embed_t', --cc_dim wide); with d_i = |e_s,i - e_t,i|,

    cc_beta * mean_i <d_i, d_i+1>

the batch's neighbouring samples standing in for the correlation matrix of the paper's eq. 5-6.
RepDistiller's weight: 0.02.
"""
import torch.nn.functional as F

from methods.base import Method, Reference, at_least_one, setting, weight
from methods.formulas import at_least_fp32
from methods.parts import torch_linear_params


def cc_loss(e_s, e_t):
    """e_s, e_t: (B, D) embeddings of the pooled features."""
    d = (at_least_fp32(e_s) - at_least_fp32(e_t)).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


class CC(Method):
    name, title, order = 'cc', 'CC', 70
    references = {'cc': Reference('RepDistiller',
                                  ('--distill', 'correlation', '-r', 1, '-a', 0, '-b', 0.02, '--feat_dim', 128),
                                  parts=((r'aux\.cc\.embed_s\.(.*)', r'module_list.1.linear.\1'),
                                         (r'aux\.cc\.embed_t\.(.*)', r'module_list.2.linear.\1')))}
    flags = (
        weight('cc_beta', 'correlation congruence: B * CC between learned embeddings of the pooled features'),
        setting('cc_dim', 128, "size of CC's linear embeddings (RepDistiller's 128)",
                at_least_one("use CC's embedding size, e.g. 128")),
    )
    reads = ('pooled',)
    examples = {'CC': {'cc_beta': 0.02}}

    def parts(self, o, nets, run):
        return {'cc': {'embed_s': torch_linear_params(nets.s.pooled.shape[1], o.cc_dim),
                       'embed_t': torch_linear_params(nets.t.pooled.shape[1], o.cc_dim)}}

    def terms(self, b):
        p = b.params
        return {'cc': cc_loss(F.linear(b.s.pooled, p['aux.cc.embed_s.weight'], p['aux.cc.embed_s.bias']),
                              F.linear(b.t.pooled, p['aux.cc.embed_t.weight'], p['aux.cc.embed_t.bias']))}

    def columns(self, table, teacher, student):
        return {'cc': {'cc_beta': 0.02}} if table == 'crd' else {}


METHOD = CC()

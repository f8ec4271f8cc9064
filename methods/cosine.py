"""The cosine between the last groups' pooled features:

    cos_beta * mean_batch (1 - cos(pool(g_s), pool(g_t)))

pool the spatial mean; a wider teacher's channels are averaged in adjacent runs down to the
student's count, so the two vectors have one length.
"""
import torch.nn.functional as F

from methods.base import Method, weight
from methods.formulas import at_least_fp32


def cosine_loss(s, t):
    """1 - cos(pool(s), pool(t)) averaged over the batch (a cosine-embedding loss with every
    pair similar), pool = spatial mean."""
    s, t = at_least_fp32(s).mean((2, 3)), at_least_fp32(t).mean((2, 3))
    if t.shape[1] != s.shape[1]:
        t = F.adaptive_avg_pool1d(t.unsqueeze(1), s.shape[1]).squeeze(1)
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()


class Cosine(Method):
    name, title, order = 'cos', 'cosine', 50
    flags = (weight('cos_beta', "B * (1 - cosine) between the last groups' pooled features"),)
    examples = {'cosine': {'cos_beta': 1}}

    def terms(self, b):
        return {'cos': cosine_loss(b.s.groups[-1], b.t.groups[-1])}


METHOD = Cosine()

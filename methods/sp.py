"""Similarity-preserving KD (Tung & Mori, ICCV 2019, eq. 2-4), as RepDistiller runs it on the
last groups: the batch's Gram matrices G = A A^T of the flattened activations, each row
L2-normalised,

    sp_beta * ||G_s - G_t||_F^2 / b^2

The two networks' channel counts need not agree, only the batch. RepDistiller's weight: 3000.
"""
import torch.nn.functional as F

from methods.base import Method, Reference, weight
from methods.formulas import at_least_fp32


def sp_loss(f_s, f_t):
    def similarity(f):
        f = at_least_fp32(f).flatten(1)
        return F.normalize(f @ f.T, dim=1)
    return (similarity(f_s) - similarity(f_t)).pow(2).mean()


class SP(Method):
    name, title, order = 'sp', 'SP', 60
    references = {'sp': Reference('RepDistiller', ('--distill', 'similarity', '-r', 1, '-a', 0, '-b', 3000))}
    flags = (weight('sp_beta', "similarity-preserving KD: B * SP between the last groups' batch Gram matrices"),)
    examples = {'SP': {'sp_beta': 3000}}

    def terms(self, b):
        return {'sp': sp_loss(b.s.groups[-1], b.t.groups[-1])}

    def columns(self, table, teacher, student):
        return {'sp': {'sp_beta': 3000}} if table == 'crd' else {}


METHOD = SP()

"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018,
arXiv:1706.00384): students of a cohort teach each other. Each member that sets --dml_beta adds
the mean, over its peers k, of the KL divergence of its prediction from the peer's (the paper's
loss for K networks, at T = 1 and weight 1):

    dml_beta * T^2 * mean_k KL(softmax(z_k / T) || softmax(z / T))

z its logits and z_k those of peer k on the same batch in the same step, detached: a peer's
prediction is a target, as the teacher's is in KD. The KL is summed over classes and averaged
over the batch. Its peers are the other members of the cohort that set dml_beta (members
without it train as they would without the DML members beside them); they may combine it with
other terms, those of a teacher included, and weigh it differently. A peer that does not take
a step (it stopped, or sits out an init stage) is not counted in it; without any, the term is 0.

The update is simultaneous: every peer's logits are those of the step's forward, before any
member's update, and all members then step. The paper's Algorithm 1 is sequential (network 1
steps, then network 2 learns from network 1's prediction recomputed after that step); the
simultaneous update is what most implementations train, and it costs no second forward and
keeps each member's step independent of the cohort's order. tests/methods/test_dml.py holds the
cohort to the two-network update written out by hand.

The term needs a cohort with at least two members that set dml_beta: a single run, or a member
without a peer, is refused. It reads no teacher. Its term is computed beside the (possibly
compiled) forward, once every member's forward has run (methods.base.Peer); members whose
settings differ only in DML share a compiled forward.
"""
import torch.nn.functional as F

from engine.errors import UserError
from methods.base import Method, positive, setting, weight
from methods.formulas import at_least_fp32

EXAMPLE = '[{"name": "dml-1", "seed": 1, "dml_beta": 1}, {"name": "dml-2", "seed": 2, "dml_beta": 1}]'


def dml_loss(z, peers, T=1.0):
    """T^2 * mean over the peers' logits z_k of KL(softmax(z_k / T) || softmax(z / T)); 0 with no
    peer."""
    log_p = F.log_softmax(at_least_fp32(z) / T, dim=1)
    kls = [F.kl_div(log_p, F.softmax(at_least_fp32(z_k.detach()) / T, dim=1), reduction='sum') / z.shape[0]
           for z_k in peers]
    return T ** 2 * sum(kls) / len(kls) if kls else log_p.new_zeros(())


def learns_mutually(o):
    return bool(getattr(o, 'dml_beta', 0))


class DML(Method):
    name, title, order = 'dml', 'DML', 500
    teacher = False  # its targets are the peers' predictions
    reads = ('peers',)
    training_only = True  # the peers' logits exist only in a training step
    flags = (
        weight('dml_beta', 'deep mutual learning, in a cohort: B * mean KL of this member\'s prediction from each '
                           'other member\'s that sets dml_beta, on the same batch (the paper: 1)',
               needs_teacher=False, forward=None),
        setting('dml_temperature', 1.0, "DML's temperature T of both predictions, the term scaled by T^2 (the "
                                        "paper: 1)", positive("DML's temperature", 1), forward=None),
    )

    def refuse_members(self, o, others):
        if not learns_mutually(o):
            return
        if others is None:
            raise UserError(f'--dml_beta {o.dml_beta:g} learns from the other members of a cohort, and a single run '
                            f'has none; train two or more members that set dml_beta with --cohort, e.g. {EXAMPLE}')
        if not any(learns_mutually(other) for other in others):
            raise UserError(f'"dml_beta": {o.dml_beta:g} learns from the other members that set dml_beta, and no '
                            f'other member does; give dml_beta to a second member, its peer, or drop it')

    def terms(self, b):
        peers = [p.logits for p in b.peers if learns_mutually(p.opt)]
        return {'dml': dml_loss(b.s.logits, peers, b.opt.dml_temperature)}


METHOD = DML()

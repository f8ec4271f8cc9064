"""Gradient-based attention transfer (Zagoruyko & Komodakis, ICLR 2017, section 3.2): the
student's input gradient J_s = dCE/dx against the teacher's,

    grad_beta/2 * mean_batch ||J_s - J_t||_2

trained by double backprop through J_s, in training steps only. It cannot be compiled, nor split
over GPUs with --ngpu (torchrun can).
"""
from methods.base import Method, weight
from methods.formulas import at_least_fp32


def input_gradient_loss(j_s, j_t):
    """|| J_s - J_t ||_2 for each sample, averaged over the batch (weighted by beta/2)."""
    return (at_least_fp32(j_s) - at_least_fp32(j_t)).flatten(1).norm(dim=1).mean()


class GradientAT(Method):
    name, title, order = 'grad_at', 'gradient-based AT', 180
    flags = (weight('grad_beta', 'gradient-based AT: B/2 * ||J_s - J_t||_2 with J = dCE/d(input)'),)
    reads = ('input_gradient', 'teacher_input_gradient')
    training_only = True
    examples = {'gradient-based AT': {'grad_beta': 1}}

    def terms(self, b):
        return {'grad_at': input_gradient_loss(b.student_input_gradient(), b.t.input_gradient)}

    def weights(self, o, epoch, epoch_step, stage):
        return {'grad_at': o.grad_beta / 2}


METHOD = GradientAT()

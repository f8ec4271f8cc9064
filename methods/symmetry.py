"""Flip symmetry of the student's input gradient (Zagoruyko & Komodakis, ICLR 2017, section 3.2):
the gradient should not change when the image is mirrored left to right,

    sym_beta/2 * mean_batch ||J_s - flip(J_s)||_2

trained by double backprop, in training steps only, with or without a teacher.
"""
from methods.base import Method, weight
from methods.grad_at import input_gradient_loss


def symmetry_loss(j):
    """|| J - flip(J) ||_2 for each sample, averaged (the paper's flip-symmetry norm)."""
    return input_gradient_loss(j, j.flip(-1))


class Symmetry(Method):
    name, title, order = 'symmetry', 'flip symmetry', 190
    flags = (weight('sym_beta', "flip symmetry: B/2 * ||J_s - flip(J_s)||_2 on the student's input gradient",
                    needs_teacher=False),)
    teacher = False
    reads = ('input_gradient',)
    training_only = True
    examples = {'flip symmetry': {'sym_beta': 1}}

    def terms(self, b):
        return {'symmetry': symmetry_loss(b.student_input_gradient())}

    def weights(self, o, epoch, epoch_step, stage):
        return {'symmetry': o.sym_beta / 2}


METHOD = Symmetry()

"""The transfer losses, each next to its formula.

Every loss takes a batch's student quantity and the matching teacher quantity and returns an
unweighted scalar; transfer.py says which are active and how much each one weighs. Inputs may
be bf16 (autocast): sums and norms are taken in fp32.

Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (sections 3.1,
3.2); Hinton et al. 2015 (KD); Romero et al. 2015 (FitNets).
"""
import torch
import torch.nn.functional as F


def at_least_fp32(x):
    """bf16/fp16 activations (autocast) are summed and normalised in fp32; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# Activation-based attention transfer (section 3.1)

def at(x, p=2):
    """Activation-based attention map: F(A) = sum_c |A_c|^p, flattened and L2-normalised per
    sample (eq. 2 uses Q / ||Q||_2). Taking the channel *mean* instead of the sum only rescales
    Q, which the normalisation removes. The paper compares p = 1, 2, 4."""
    a = at_least_fp32(x)
    a = a.pow(2) if p == 2 else a.abs().pow(p)
    return F.normalize(a.mean(1).flatten(1))


def same_resolution(x, y):
    """Two activations at one spatial size: the larger is average-pooled down to the smaller,
    the CRD benchmark's rule (RepDistiller) for pairs of different architectures, whose groups
    may end at different resolutions (ShuffleNet's at 16, 8, 4 against ResNet's 32, 16, 8).
    The activations are pooled, not the maps, as RepDistiller does, so that AT figures of such
    pairs compare with its own."""
    if x.shape[2:] == y.shape[2:]:
        return x, y
    x, y = at_least_fp32(x), at_least_fp32(y)
    if x.shape[2] > y.shape[2]:
        return F.adaptive_avg_pool2d(x, y.shape[2:]), y
    return x, F.adaptive_avg_pool2d(y, x.shape[2:])


def at_loss(x, y, p=2):
    """Squared difference of the two normalised attention maps, averaged over batch and
    positions: the reference code's form, for which beta = 1e3 in the paper's experiments is
    calibrated (the default). Maps of different sizes meet at the smaller (same_resolution)."""
    x, y = same_resolution(x, y)
    return (at(x, p) - at(y, p)).pow(2).mean()


def at_loss_paper(x, y, p=2):
    """Eq. 2 as printed: || Q_s/||Q_s||_2 - Q_t/||Q_t||_2 ||_2 for each sample, averaged over
    the batch; the paper's beta/2 is applied as the weight."""
    x, y = same_resolution(x, y)
    return (at(x, p) - at(y, p)).norm(dim=1).mean()


# ----------------------------------------------------------------------------------------------
# Knowledge distillation (Hinton et al. 2015)

def distillation(y, teacher_scores, labels, T, alpha):
    """alpha * T^2 * KL(softmax(t/T) || softmax(y/T)) + (1 - alpha) * CE(y, labels),
    the KL summed over classes and averaged over the batch. T^2 keeps the soft-target
    gradients on the same scale as the hard-target ones when T changes."""
    p = F.log_softmax(y / T, dim=1)
    q = F.softmax(teacher_scores / T, dim=1)
    kl = F.kl_div(p, q, reduction='sum') * (T ** 2) / y.shape[0]
    return alpha * kl + (1. - alpha) * F.cross_entropy(y, labels)


# ----------------------------------------------------------------------------------------------
# Gradient-based attention transfer (section 3.2)

def input_gradient(logits, labels, x, create_graph=False):
    """J = dL/dx, the cross-entropy's gradient with respect to the input image. The loss is
    summed over the batch, so each sample's J is its own loss's gradient whatever the batch
    size. create_graph=True keeps J differentiable (for the student: double backprop)."""
    loss = F.cross_entropy(at_least_fp32(logits), labels, reduction='sum')
    return torch.autograd.grad(loss, x, create_graph=create_graph)[0]


def input_gradient_loss(j_s, j_t):
    """|| J_s - J_t ||_2 for each sample, averaged over the batch (weighted by beta/2)."""
    return (at_least_fp32(j_s) - at_least_fp32(j_t)).flatten(1).norm(dim=1).mean()


def symmetry_loss(j):
    """|| J - flip(J) ||_2 for each sample, averaged: the student's input gradient should not
    change when the image is mirrored left to right (the paper's flip-symmetry norm)."""
    return input_gradient_loss(j, j.flip(-1))


# ----------------------------------------------------------------------------------------------
# Feature losses: full-activation transfer (the paper's F-ActT), FitNets hints, cosine

def feature_distance(s, t):
    """Mean squared difference of two activation tensors of equal shape: F-ActT compares each
    group's output in full, FitNets compares a regressed student group with the teacher's."""
    return (at_least_fp32(s) - at_least_fp32(t)).pow(2).mean()


def cosine_loss(s, t):
    """1 - cos(pool(s), pool(t)) averaged over the batch (a cosine-embedding loss with every
    pair similar), pool = spatial mean. A wider teacher's channels are averaged in adjacent
    runs down to the student's count, so the two vectors have one length."""
    s, t = at_least_fp32(s).mean((2, 3)), at_least_fp32(t).mean((2, 3))
    if t.shape[1] != s.shape[1]:
        t = F.adaptive_avg_pool1d(t.unsqueeze(1), s.shape[1]).squeeze(1)
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()

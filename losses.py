"""The transfer losses, each next to its formula.

Every loss takes a batch's student quantity and the matching teacher quantity and returns an
unweighted scalar; transfer.py says which are active and how much each one weighs. Inputs may
be bf16 (autocast): sums and norms are taken in fp32.

Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (sections 3.1,
3.2); Hinton et al. 2015 (KD); Romero et al. 2015 (FitNets). Below them, the other methods of
the CRD paper's benchmark and of mdistiller, each with its own paper in its docstring.
"""
import math

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

def distillation(y, teacher_scores, labels, T, alpha, standardize=False):
    """alpha * T^2 * KL(softmax(t/T) || softmax(y/T)) + (1 - alpha) * CE(y, labels),
    the KL summed over classes and averaged over the batch. T^2 keeps the soft-target
    gradients on the same scale as the hard-target ones when T changes. standardize=True
    z-scores both logits before the temperature (standardize_logits); the CE keeps the raw
    logits, as in the logit-standardization paper's code."""
    s, t = (standardize_logits(y), standardize_logits(teacher_scores)) if standardize else (y, teacher_scores)
    p = F.log_softmax(s / T, dim=1)
    q = F.softmax(t / T, dim=1)
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


# ----------------------------------------------------------------------------------------------
# The other methods of the CRD paper's benchmark (Tian et al. 2020, table 1; its code,
# RepDistiller, is the reference for every form below) and of mdistiller (DKD). Inputs as
# RepDistiller's train_student.py hands them out: feat[1:-1] are our groups, feat[-2] the last
# group, feat[-1] the pooled feature (the networks' pooled=True).

def sp_loss(f_s, f_t):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, eq. 2-4): G = A A^T over the batch's
    flattened activations, each row L2-normalised; the loss is ||G_s - G_t||_F^2 / b^2. The
    two networks' channel counts need not agree, only the batch."""
    def similarity(f):
        f = at_least_fp32(f).flatten(1)
        return F.normalize(f @ f.T, dim=1)
    return (similarity(f_s) - similarity(f_t)).pow(2).mean()


def cc_loss(e_s, e_t):
    """Correlation congruence (Peng et al., ICCV 2019) in its authors' code, as RepDistiller
    runs it: with d_i = |e_s,i - e_t,i| the loss is the mean over neighbouring samples of
    <d_i, d_i+1>, the batch standing in for the correlation matrix of the paper's eq. 5-6.
    e_s, e_t: (B, 128) embeddings of the pooled features (linear layers of the method's own)."""
    d = (at_least_fp32(e_s) - at_least_fp32(e_t)).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


def pairwise_distance(e, eps=1e-12):
    """Euclidean distances between the rows of e, zero on the diagonal. The squared distance is
    clamped at eps before the square root, which keeps the root's gradient finite where two
    samples coincide."""
    square = e.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_loss(e_s, e_t, w_d=25, w_a=50):
    """Relational KD (Park et al., CVPR 2019, eq. 4-7): w_d * Huber(psi_D) + w_a * Huber(psi_A).
    psi_D compares the batch's pairwise distances, each network's divided by its mean over
    pairs i != j; psi_A the cosines of the angles at every vertex j of every triangle (i, j, k).
    Huber = smooth L1 with delta 1, averaged over the b^2 pairs and b^3 triples; the teacher's
    relations are fixed targets (no gradient), as in the reference."""
    s, t = at_least_fp32(e_s).flatten(1), at_least_fp32(e_t).flatten(1).detach()
    n = len(s)
    d_s, d_t = pairwise_distance(s), pairwise_distance(t)
    # the clamp makes every off-diagonal distance positive, so this is the mean over i != j
    distance = F.smooth_l1_loss(d_s / (d_s.sum() / (n * (n - 1))), d_t / (d_t.sum() / (n * (n - 1))))

    def cosines(e):
        u = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # u[j, i] = unit vector e_i - e_j
        return u @ u.transpose(1, 2)
    return w_d * distance + w_a * F.smooth_l1_loss(cosines(s), cosines(t))


def pkt_loss(e_s, e_t, eps=1e-7):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, eq. 9-10, cosine kernel):
    each network's cosine similarities between the batch's samples, shifted to [0, 1] and
    normalised to a conditional distribution p(j | i) per row; the loss is the mean over the
    b^2 entries of p_t log(p_t / p_s) (the authors' code: a mean, not a sum; eps as theirs)."""
    def conditional(e):
        e = at_least_fp32(e)
        e = e / (e.pow(2).sum(1, keepdim=True).sqrt() + eps)
        k = (e @ e.T + 1) / 2
        return k / k.sum(1, keepdim=True)
    p_s, p_t = conditional(e_s), conditional(e_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def nst_loss(f_s, f_t):
    """Neuron selectivity transfer (Huang & Wang 2017, eq. 5-6, polynomial kernel k(x, y) =
    (x^T y)^2): squared MMD between the sets of channel maps, each map flattened and
    L2-normalised over positions: mean k(t, t') + mean k(s, s') - 2 mean k(s, t), the means
    over all channel pairs and the batch. One group pair; maps of different sizes meet at the
    smaller (same_resolution), as in RepDistiller."""
    f_s, f_t = same_resolution(f_s, f_t)
    s = F.normalize(at_least_fp32(f_s).flatten(2), dim=2)
    t = F.normalize(at_least_fp32(f_t).flatten(2), dim=2)

    def kernel(a, b):
        return (a @ b.transpose(1, 2)).pow(2).mean()
    return kernel(t, t).detach() + kernel(s, s) - 2 * kernel(s, t)


def fsp_matrix(a, b):
    """The FSP matrix of Yim et al. (CVPR 2017, eq. 1): G_ij = sum over positions of
    a_i * b_j / (h w), (B, C_a, C_b), the larger map pooled to the smaller (same_resolution)."""
    a, b = same_resolution(a, b)
    a, b = at_least_fp32(a).flatten(2), at_least_fp32(b).flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(groups_s, groups_t):
    """FSP (Yim et al., CVPR 2017, eq. 2): the mean squared difference of the student's and the
    teacher's FSP matrices between consecutive groups, summed over the pairs of groups, as
    RepDistiller sums them (it averages where the paper sums, and weighs pairs equally).
    Student and teacher groups must have the same channel counts."""
    return sum((fsp_matrix(s0, s1) - fsp_matrix(t0, t1)).pow(2).mean()
               for s0, s1, t0, t1 in zip(groups_s, groups_s[1:], groups_t, groups_t[1:]))


class FiniteGradient(torch.autograd.Function):
    """Identity whose gradient has non-finite entries replaced by 0. The SVD's backward divides
    by differences of squared singular values, all of them, also of the vectors KDSVD discards
    (whose gradient is 0): repeated or vanishing ones give 0 * inf = NaN, which would end the run."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def right_singular_vectors(f, n):
    """The first n right singular vectors of each sample's (positions x channels) matrix, each
    L2-normalised over channels, and the first n singular values normalised to unit length."""
    x = at_least_fp32(f).flatten(2).transpose(1, 2)
    # LAPACK refuses non-finite input with an exception; a diverged student must instead give a
    # non-finite loss, which stops its run at its last good checkpoint (and lets a cohort go on).
    finite = torch.isfinite(x).flatten(1).all(1)[:, None, None]
    _, sigma, vh = torch.linalg.svd(FiniteGradient.apply(torch.where(finite, x, 0.0)), full_matrices=False)
    vh, sigma = torch.where(finite, vh, math.nan), torch.where(finite[:, 0], sigma, math.nan)
    return F.normalize(vh[:, :n].transpose(1, 2), dim=1), F.normalize(sigma[:, :n], dim=1)


def kdsvd_loss(groups_s, groups_t, k=1):
    """KD with singular value decomposition (Lee et al., ECCV 2018), as RepDistiller's KDSVD
    computes it. Each group is summarised by its first k right singular vectors (the teacher's)
    and the student's among its first k + 3 best aligned with each (largest |cosine|, sign
    matched), both scaled by the teacher's normalised singular values. Consecutive groups meet
    in an RBF map exp(-(v_c - v'_c')^2 / 8) over their channel pairs; the loss is the squared
    difference of the two networks' maps, summed and divided by the batch size, summed over the
    pairs of groups. Student and teacher groups must have the same channel counts."""
    terms, previous = [], None
    for f_s, f_t in zip(groups_s, groups_t):
        v_t, sigma_t = right_singular_vectors(f_t, k)
        v_s, _ = right_singular_vectors(f_s, k + 3)
        cosine = v_s.transpose(1, 2) @ v_t  # (B, k + 3, k)
        best = cosine.abs() == cosine.abs().amax(1, keepdim=True)
        v_s = v_s @ torch.where(best, cosine.sign(), torch.zeros_like(cosine))
        v_s, v_t = v_s * sigma_t[:, None], v_t * sigma_t[:, None]
        if previous is not None:
            rbf_s = torch.exp(-(v_s[:, :, None] - previous[0][:, None]).pow(2) / 8)
            rbf_t = torch.exp(-(v_t[:, :, None] - previous[1][:, None]).pow(2) / 8)
            term = (rbf_s - rbf_t.detach()).pow(2)
            # a degenerate decomposition (repeated singular values) gives no usable direction
            terms.append(torch.where(torch.isfinite(term), term, torch.zeros_like(term)).sum() / len(f_s))
        previous = v_s, v_t
    return sum(terms)


def vid_loss(mean, t, log_scale, eps=1e-5):
    """Variational information distillation (Ahn et al., CVPR 2019, eq. 6-8): the negative log
    likelihood of the teacher group t under a Gaussian of mean `mean` (a regressor's output on
    the student group) and per-channel variance softplus(log_scale) + eps, constant dropped:
    mean over all entries of ((t - mean)^2 / var + log var) / 2. One group pair; a larger
    teacher group is pooled to the student's size (RepDistiller pools a larger student group
    before its regressor, which is the caller's to do)."""
    mean, t = same_resolution(mean, t)
    mean, t = at_least_fp32(mean), at_least_fp32(t)
    var = (F.softplus(at_least_fp32(log_scale)) + eps).view(-1, *[1] * (t.dim() - 2))
    return (0.5 * ((mean - t).pow(2) / var + var.log())).mean()


def standardize_logits(z, eps=1e-7):
    """Logit standardization (Sun et al., CVPR 2024, eq. 9): each sample's logits minus their
    mean, divided by eps + their standard deviation (the unbiased one, torch.std's default, as
    the paper's code takes it), applied before the base temperature."""
    z = at_least_fp32(z)
    return (z - z.mean(1, keepdim=True)) / (eps + z.std(1, keepdim=True))


def dkd_loss(y_s, y_t, labels, alpha=1.0, beta=8.0, T=4.0, standardize=False):
    """Decoupled KD (Zhao et al., CVPR 2022, eq. 7): alpha * TCKD + beta * NCKD, each times T^2
    and averaged over the batch. TCKD is the KL between the binary distributions (target class,
    all others) of teacher and student; NCKD the KL between their distributions over the
    non-target classes alone. standardize=True z-scores both logits first (standardize_logits)."""
    if standardize:
        y_s, y_t = standardize_logits(y_s), standardize_logits(y_t)
    z_s, z_t = at_least_fp32(y_s) / T, at_least_fp32(y_t) / T
    target = F.one_hot(labels, z_s.shape[1]).bool()

    def log_probabilities(z):
        """log (p_target, 1 - p_target) and log p(class | not target), exactly 0 at the target."""
        others = z.masked_fill(target, float('-inf'))
        binary = torch.cat([z.gather(1, labels[:, None]), others.logsumexp(1, keepdim=True)], 1)
        return binary - z.logsumexp(1, keepdim=True), others.log_softmax(1).masked_fill(target, 0)
    b_s, n_s = log_probabilities(z_s)
    b_t, n_t = log_probabilities(z_t)
    tckd = (b_t.exp() * (b_t - b_s)).sum() / len(z_s)
    nckd = (n_t.exp().masked_fill(target, 0) * (n_t - n_s)).sum() / len(z_s)
    return T ** 2 * (alpha * tckd + beta * nckd)


# ----------------------------------------------------------------------------------------------
# Contrastive representation distillation (Tian et al., ICLR 2020)

def nce_loss(scores, n_data, eps=1e-7):
    """-(1/B) sum_b [log h(pos_b) + sum_k log(1 - h(neg_bk))] with h = P / (P + K/N) (eq. 19 with
    RepDistiller's normalised score P = exp(.../T) / Z in place of exp(.../T)): NCE of the
    positive in column 0 against the K negatives after it, the noise drawing any of the N
    training images with probability 1/N. eps keeps the logarithms finite, as RepDistiller's."""
    k = scores.shape[1] - 1
    noise = k / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    return -(torch.log(pos / (pos + noise + eps)).sum() + torch.log(noise / (neg + noise + eps)).sum()) / len(scores)


def crd_loss(scores_s, scores_t, n_data, eps=1e-7):
    """CRD's objective, the negative of the critic's bound (eq. 18)
        L = -E_{q(T,S|C=1)}[log h(T,S)] - K E_{q(T,S|C=0)}[log(1 - h(T,S))],
    taken both ways as RepDistiller's CRDLoss: with the student's embedding as anchor against
    the teacher memory (scores_s), and the teacher's against the student memory (scores_t), each
    (B, 1+K) scores P from auxiliary.crd_scores, the sample itself in column 0."""
    return nce_loss(scores_s, n_data, eps) + nce_loss(scores_t, n_data, eps)


# ----------------------------------------------------------------------------------------------
# Losses on pre-activation features and on a student's reconstructions of the teacher's groups

def ab_loss(groups_s, groups_t, margin=1.0):
    """Activation boundaries (Heo et al., AAAI 2019, eq. 5-6), as RepDistiller's AB.py sums it.
    groups_s: the student's groups mapped by connectors to the teacher's shape; groups_t: the
    teacher's pre-ReLU groups. Where the teacher's neuron is off (t <= 0) a student above -margin
    costs (s + margin)^2; where it is on, a student below margin costs (s - margin)^2. Each
    group's cost is summed, divided by the batch size and weighted 2^-(n-1-i) (the last group
    counts fully); RepDistiller's further factor 3/1000 is kept, so that its weight 1 applies."""
    n, total = len(groups_s), 0
    for i, (s, t) in enumerate(zip(groups_s, groups_t)):
        s, t = at_least_fp32(s), at_least_fp32(t)
        cost = (s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0))
        total = total + 2. ** (i - n + 1) * cost.sum() / len(s)
    return total * 3 / 1000


def ft_loss(factor_s, factor_t):
    """Factor transfer (Kim et al., NeurIPS 2018, eq. 3 with p = 1) as RepDistiller's
    FactorTransfer computes it: the mean absolute difference of the two factors (the student's
    translator output, the teacher's paraphraser output), each summarised by RepDistiller's
    factor(): the per-position mean of its squared channels, flattened and L2-normalised (the
    attention map `at` of the factor, where the paper normalises the whole factor). The larger
    factor is pooled to the other's size first."""
    factor_s, factor_t = same_resolution(factor_s, factor_t)
    return (at(factor_s) - at(factor_t)).abs().mean()


def ofd_margin(bn_weight, bn_bias):
    """The margin of overhaul feature distillation (Heo et al., ICCV 2019, eq. 3): for a pre-ReLU
    response x ~ N(m, s^2), m and s the teacher BN's shift and |scale|, the expectation of x
    where it is negative, m - s phi(m/s) / Phi(-m/s); -3s where Phi(-m/s) <= 0.001 (the
    response is almost never negative), as mdistiller does. (C,) tensor."""
    s, m = bn_weight.detach().double().abs(), bn_bias.detach().double()
    tail = torch.special.ndtr(-m / s)
    expectation = m - s * torch.exp(-(m / s).pow(2) / 2) / math.sqrt(2 * math.pi) / tail
    return torch.where(tail > 0.001, expectation, -3 * s).to(bn_weight.dtype)


def ofd_loss(source, target, margin):
    """Overhaul feature distillation's partial L2 (Heo et al., ICCV 2019, eq. 4), mdistiller's
    feat_loss, between the connector's output s and the teacher's pre-ReLU group t, with the
    per-channel margin m ((C,), see ofd_margin): (s - t)^2 where t > 0; where m < t <= 0,
    (s - t)^2 if s > t, else nothing; where t <= m, (s - m)^2 if s > m, else nothing (a
    student below the teacher's negative responses is not pushed up: the ReLU hides them).
    Summed over channels and positions, averaged over the batch. One group pair at one size
    (mdistiller pools the teacher to the student's size)."""
    s, t = at_least_fp32(source), at_least_fp32(target)
    m = at_least_fp32(margin).view(1, -1, *[1] * (s.dim() - 2))
    cost = ((s - m).pow(2) * ((s > m) & (t <= m)) + (s - t).pow(2) * ((s > t) & (t > m) & (t <= 0))
            + (s - t).pow(2) * (t > 0))
    return cost.sum() / len(s)


def hcl_loss(fs, ft):
    """Hierarchical context loss of knowledge review (Chen et al., CVPR 2021, section 3.4),
    mdistiller's hcl_loss: for each pair of maps, the mean squared error at full size and after
    average pooling to 4x4, 2x2 and 1x1 (only the levels smaller than the map), weighted 1, 1/2,
    1/4, 1/8 and divided by the weights' sum; summed over the pairs."""
    total = 0
    for s, t in zip(fs, ft):
        s, t = at_least_fp32(s), at_least_fp32(t)
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size < s.shape[2]:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
                weights += weight
        total = total + loss / weights
    return total

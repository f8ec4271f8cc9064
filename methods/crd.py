"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller
trains it. Both pooled features are embedded (linear maps, L2-normalised: 'aux.crd.embed_s',
'aux.crd.embed_t') and scored against a momentum memory of every training image's embeddings
('aux.crd.memory_s', 'aux.crd.memory_t', updated in the forward, never by the optimizer): the
sample itself against K negatives, images of other classes drawn at each step. The objective,
both ways (the student's embedding against the teacher memory and the other way round), is

    crd_beta * (NCE(scores_s) + NCE(scores_t)),   NCE = -(1/B) sum_b [log h(pos) + sum_k log(1 - h(neg_k))]

with h = P / (P + K/N) (eq. 18-19), P = exp(m . e / T) / Z. RepDistiller's weight: 0.8; with
--kd_beta 1 beside it, CRD+KD. Training steps only; the memory keeps the run to one process (no
torchrun) and its forward uncompiled.
"""
import torch

from engine.errors import UserError
from engine.rules import NUMBER, Rule
from methods.base import Method, Reference, at_least_one, positive, setting, weight
from methods.formulas import at_least_fp32
from methods.parts import torch_linear_params

# RepDistiller's negatives per sample.
NCE_K = 16384
# The keys of one chunk of the negatives' draw: at most this many random numbers at once.
DRAW_CHUNK = 2 ** 24


def crd_params(dim_s, dim_t, feat_dim, n_data):
    """CRD's linear embeddings of the student's and the teacher's pooled features (RepDistiller's
    Embed; initialised as CC's), the memory of every training image's student ('memory_s') and
    teacher ('memory_t') embedding, each row uniform in +-1/sqrt(feat_dim/3) as RepDistiller's
    ContrastMemory starts, and the normalisation constants Z of the two scores ('z': -1 until the
    first training batch fixes them)."""
    bound = (feat_dim / 3) ** -0.5
    return {'embed_s': torch_linear_params(dim_s, feat_dim), 'embed_t': torch_linear_params(dim_t, feat_dim),
            'memory_s': torch.rand(n_data, feat_dim) * (2 * bound) - bound,
            'memory_t': torch.rand(n_data, feat_dim) * (2 * bound) - bound,
            'z': torch.full((2,), -1.0)}


def embed(f, params, base):
    """A linear map of a pooled feature, L2-normalised per sample (RepDistiller's Embed), in fp32
    at least: its scores against the memory are exponentiated at temperature 0.07."""
    e = at_least_fp32(torch.nn.functional.linear(f, params[base + '.weight'], params[base + '.bias']))
    return e / e.norm(dim=1, keepdim=True)


def classes_of(labels):
    """What drawing negatives needs of the training labels (N,), computed once: the images'
    positions sorted by class, and each class's count and first place in that order."""
    counts = torch.bincount(labels)
    order = torch.argsort(labels, stable=True)
    return {'order': order, 'counts': counts, 'starts': torch.cumsum(counts, 0) - counts,
            'n': len(labels), 'fewest_others': len(labels) - int(counts.max()),
            'most_others': len(labels) - int(counts[counts > 0].min())}


def negatives(classes, y, k, generator):
    """(B, k) indices of training images of other classes than each sample's label y, uniform
    without replacement, or with replacement where a class has fewer than k others: RepDistiller's
    'exact' mode. Drawn by position j among the M = N - n_c images outside the sample's class c in
    class order; the k smallest of M uniform keys are a uniform k-subset."""
    others = classes['n'] - classes['counts'][y]  # M per sample
    j = None
    if k <= classes['most_others']:
        width = classes['most_others']
        draws = []
        for rows in torch.split(others, max(1, DRAW_CHUNK // width)):  # bounded memory at ImageNet's size
            keys = torch.rand(len(rows), width, generator=generator, device=y.device)
            keys.masked_fill_(torch.arange(width, device=y.device) >= rows[:, None], 2.0)  # past M: never drawn
            draws.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)  # the order does not matter
        j = torch.cat(draws)
    if k > classes['fewest_others']:  # a class has fewer than k others: its samples draw with replacement
        u = torch.rand(len(y), k, generator=generator, device=y.device, dtype=torch.float64)
        repeated = (u * others[:, None]).long().clamp_max(others[:, None] - 1)
        j = repeated if j is None else torch.where(others[:, None] >= k, j, repeated)
    start, count = classes['starts'][y][:, None], classes['counts'][y][:, None]
    return classes['order'][j + (j >= start) * count]


def scores(e_s, e_t, params, base, contrast, T, n_data):
    """The two sets of scores P = exp(m . e / T) / Z of RepDistiller's ContrastMemory, each (B, 1+K)
    with the sample itself in column 0: the student's embedding against the teacher memory's rows
    at `contrast`, and the teacher's against the student memory's. Z = N times the mean score of
    the first training batch, fixed in place from then on (and checkpointed with it). Computed
    outside autocast: a bf16 dot product of unit vectors (under three significant digits), divided
    by 0.07 and exponentiated, would put a relative error of several percent on each score."""
    z = params[base + '.z']
    with torch.autocast(e_s.device.type, enabled=False):
        out_s = torch.exp(torch.bmm(params[base + '.memory_t'][contrast], e_s[:, :, None])[:, :, 0] / T)
        out_t = torch.exp(torch.bmm(params[base + '.memory_s'][contrast], e_t[:, :, None])[:, :, 0] / T)
        with torch.no_grad():  # a where, not an `if`: no value is read back to the host
            z.copy_(torch.where(z < 0, torch.stack([out_s.mean(), out_t.mean()]).to(z.dtype) * n_data, z))
        return out_s / z[0], out_t / z[1]


def update_memory_(e_s, e_t, params, base, index, momentum):
    """Each batch image's memory rows move towards its new embeddings and are renormalised:
    m <- (momentum m + (1 - momentum) e) / ||...||_2 (RepDistiller's ContrastMemory)."""
    with torch.no_grad():
        for name, e in (('memory_s', e_s), ('memory_t', e_t)):
            memory = params[f'{base}.{name}']
            rows = memory[index] * momentum + e.to(memory.dtype) * (1 - momentum)
            memory.index_copy_(0, index, rows / rows.norm(dim=1, keepdim=True))


def nce_loss(scores, n_data, eps=1e-7):
    """-(1/B) sum_b [log h(pos_b) + sum_k log(1 - h(neg_bk))] with h = P / (P + K/N): NCE of the
    positive in column 0 against the K negatives after it, the noise drawing any of the N
    training images with probability 1/N. eps keeps the logarithms finite, as RepDistiller's."""
    k = scores.shape[1] - 1
    noise = k / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    return -(torch.log(pos / (pos + noise + eps)).sum() + torch.log(noise / (neg + noise + eps)).sum()) / len(scores)


def crd_loss(scores_s, scores_t, n_data, eps=1e-7):
    """CRD's objective, the negative of the critic's bound (eq. 18), taken both ways as
    RepDistiller's CRDLoss: scores_s the student's embedding against the teacher memory, scores_t
    the teacher's against the student memory, each (B, 1+K), the sample itself in column 0."""
    return nce_loss(scores_s, n_data, eps) + nce_loss(scores_t, n_data, eps)


def draw_seed(seed, step):
    """The seed of the negatives at 1-based global `step` of a run seeded `seed` (both below 2**32):
    a pure function of the step, so a resumed run draws what an uninterrupted one does and no
    generator state is checkpointed."""
    return (seed << 32) + step


class CRD(Method):
    name, title, order = 'crd', 'CRD', 210
    # RepDistiller's memory_v1 holds the student's embeddings, its params[2:4] the two Z; K is the run's.
    references = {column: Reference('RepDistiller', ('--distill', 'crd', '-r', 1, '-a', alpha, '-b', 0.8,
                                                     '--nce_k', '{crd_nce_k}', '--feat_dim', '{crd_feat_dim}'), parts=(
        (r'aux\.crd\.embed_s\.(.*)', r'module_list.1.linear.\1'),
        (r'aux\.crd\.embed_t\.(.*)', r'module_list.2.linear.\1'),
        (r'aux\.crd\.memory_s', 'criterion_list.2.contrast.memory_v1'),
        (r'aux\.crd\.memory_t', 'criterion_list.2.contrast.memory_v2'),
        (r'aux\.crd\.z', 'criterion_list.2.contrast.params[2:4]')))
        for column, alpha in (('crd', 0), ('crd_kd', 1))}
    flags = (
        weight('crd_beta', "contrastive representation distillation: B * CRD between the pooled features "
                           "(RepDistiller's weight: 0.8)"),
        setting('crd_feat_dim', 128, "size of CRD's embeddings", at_least_one("use CRD's embedding size, e.g. 128")),
        setting('crd_nce_k', NCE_K, 'negatives per sample: training images of other classes, drawn at each step',
                at_least_one('use at least one negative per image, e.g. 16384')),
        setting('crd_nce_t', 0.07, "temperature of CRD's scores", positive("CRD's temperature", 0.07)),
        setting('crd_nce_m', 0.5, "momentum of CRD's memory updates",
                Rule(NUMBER, lambda v: 0 <= v < 1, 'is outside [0, 1)',
                     "use the memory's momentum, e.g. 0.5 (1 would never update it)")),
    )
    reads = ('pooled',)
    training_only = True
    buffers = ('memory_s', 'memory_t', 'z')
    compiles = False  # it updates its memory in place inside the forward, which a compiled graph would not replay
    own_forward = True  # it draws its negatives from its run's seed and step
    examples = {'CRD': {'crd_beta': 0.8}, 'CRD+KD': {'crd_beta': 0.8, 'kd_beta': 1}}

    def refuse(self, o, context):
        if o.crd_beta and context.torchrun:
            raise UserError('--crd_beta keeps a memory of every training image, which each process of a torchrun '
                            'job would update with its own slice of the batch only; train CRD in one process '
                            '(--ngpu N splits its batches over N GPUs)')

    def parts(self, o, nets, run):
        """For the N training images of `nets.train_labels`: embeddings to train, memories and Z to
        update in the forward."""
        labels = nets.train_labels
        n = len(labels)
        if o.crd_nce_k > n - 1:
            raise UserError(f'--crd_nce_k {o.crd_nce_k} asks for more negatives per image than the {n} training '
                            f'images hold besides it ({n - 1}); use --crd_nce_k {n - 1} or fewer')
        run.state['crd'] = classes_of(labels)
        if run.state['crd']['most_others'] == 0:
            raise UserError(f'--crd_beta draws its negatives from other classes, and all {n} training images '
                            f'have one label; train on data of two classes or more, or drop --crd_beta')
        return {'crd': crd_params(nets.s.pooled.shape[1], nets.t.pooled.shape[1], o.crd_feat_dim, n)}

    def terms(self, b):
        """Both pooled features embedded, scored against the memories at the sample itself and
        --crd_nce_k negatives drawn for this step, then the batch's memory rows moved towards the
        new embeddings (after the scores, as RepDistiller)."""
        o, classes, p = b.opt, b.run.state['crd'], b.params
        e_s, e_t = embed(b.s.pooled, p, 'aux.crd.embed_s'), embed(b.t.pooled, p, 'aux.crd.embed_t')
        generator = torch.Generator(b.y.device).manual_seed(draw_seed(o.seed, b.step))
        contrast = torch.cat([b.index[:, None], negatives(classes, b.y, o.crd_nce_k, generator)], 1)
        scores_s, scores_t = scores(e_s, e_t, p, 'aux.crd', contrast, o.crd_nce_t, classes['n'])
        update_memory_(e_s.detach(), e_t.detach(), p, 'aux.crd', b.index, o.crd_nce_m)
        return {'crd': crd_loss(scores_s, scores_t, classes['n'])}

    def columns(self, table, teacher, student):
        return {'crd': {'crd_beta': 0.8}, 'crd_kd': {'crd_beta': 0.8, 'kd_beta': 1}} if table == 'crd' else {}

    def for_training_set(self, options, n_train):
        return {**options, 'crd_nce_k': min(options.get('crd_nce_k', NCE_K), n_train - 1)}


METHOD = CRD()

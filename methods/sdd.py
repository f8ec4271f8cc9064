"""Scale decoupled distillation, SDD (Wei, Luo & Luo, "Scale Decoupled Knowledge Distillation",
CVPR 2024), as its authors train it on CIFAR-100: the map each network's classifier pools is
average-pooled to 4x4 and from there to every scale m of --sdd_scales (1x1 first, then 2x2, then
4x4), and the network's own classifier, weight and bias, scores each of the R regions. With z_ir
the region logits of sample i and L a logit loss (DKD or KD) at --temperature,

    sdd_beta * min(epoch / sdd_warmup, 1) * 1/(R B) sum_i sum_r w_ir L(z^s_ir, z^t_ir, y_i)

where w_ir is 1 where the teacher's region prediction is right exactly when its global (1x1)
prediction is (a consistent region), and --sdd_complementary (2) where one is right and the other
wrong (a complementary region); the global regions count 1. L = DKD at --dkd_alpha and
--dkd_nckd (SDD-DKD, the paper's headline method), or KD (SDD-KD); the usual cross-entropy
stays beside it. With --sdd_scales 1 it is DKD or KD of the logits.

Its authors' CIFAR-100 settings: SDD-DKD as DKD (weight 1 beside cross-entropy 1, T 4, DKD's beta
per pair) warmed up over 20 epochs; SDD-KD as mdistiller's KD (0.1 CE + 0.9 KD, T 4), not warmed
up; scales 1, 2 for two networks of one family (their resnet32x4 -> resnet8x4 and vgg13 -> vgg8
runs), 1, 2, 4 for two of different families. Their trainer also clips the gradient's norm at 40,
which this suite does not (their SDD-NKD variant is not here).
"""
import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.rules import INTEGER, choice
from methods.base import Method, Reference, not_negative, setting, warmed_up, weight
from methods.dkd import NCKD
from methods.formulas import at_least_fp32

SCALES = ('1,2,4', '1,2', '1')
LOSSES = ('dkd', 'kd')
# Its authors' DKD beta of pairs beyond mdistiller's (configs/cifar100/sdd_dkd/).
SDD_NCKD = {**NCKD, ('vgg13', 'ShuffleV1'): 6, ('wrn_40_2', 'MobileNetV2'): 6}


def region_logits(feature_map, fc_weight, fc_bias, scales):
    """(R, B, K): the classifier applied to the map's average over each region, scale by scale
    (the smaller scales pooled from the 4x4 one, as the authors pool them)."""
    finest = F.adaptive_avg_pool2d(at_least_fp32(feature_map), 4)
    regions = torch.cat([F.adaptive_avg_pool2d(finest, m).flatten(2) for m in scales], 2)  # (B, C, R)
    return F.linear(regions.permute(2, 0, 1), at_least_fp32(fc_weight), at_least_fp32(fc_bias))


def kd_rows(z_s, z_t, T):
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)) of each row."""
    return F.kl_div(F.log_softmax(z_s / T, 1), F.log_softmax(z_t / T, 1), reduction='none', log_target=True
                    ).sum(1) * T ** 2


def dkd_rows(z_s, z_t, labels, alpha, beta, T):
    """T^2 (alpha TCKD + beta NCKD) of each row (methods/dkd.py's terms, not averaged)."""
    target = F.one_hot(labels, z_s.shape[1]).bool()

    def log_probabilities(z):
        z = z / T
        others = z.masked_fill(target, float('-inf'))
        binary = torch.cat([z.gather(1, labels[:, None]), others.logsumexp(1, keepdim=True)], 1)
        return binary - z.logsumexp(1, keepdim=True), others.log_softmax(1).masked_fill(target, 0)
    b_s, n_s = log_probabilities(z_s)
    b_t, n_t = log_probabilities(z_t)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    nckd = (n_t.exp().masked_fill(target, 0) * (n_t - n_s)).sum(1)
    return T ** 2 * (alpha * tckd + beta * nckd)


def region_weights(z_t, labels, complementary):
    """(R, B): 1 where the teacher's region prediction is as right (or wrong) as its global one,
    `complementary` where they differ. Row 0 is the global region."""
    right = z_t.argmax(2) == labels
    return torch.where(right == right[0], 1.0, complementary).to(z_t.dtype)


def sdd_loss(z_s, z_t, labels, T, loss='dkd', alpha=1.0, beta=8.0, complementary=2.0):
    """The weighted mean over regions and samples of the logit loss; z_s, z_t (R, B, K)."""
    R, B, K = z_s.shape
    y = labels.repeat(R)
    s, t = z_s.reshape(R * B, K), z_t.reshape(R * B, K)
    rows = dkd_rows(s, t, y, alpha, beta, T) if loss == 'dkd' else kd_rows(s, t, T)
    return (region_weights(z_t, labels, complementary).flatten() * rows).sum() / (R * B)


def scales_of(o):
    return [int(m) for m in o.sdd_scales.split(',')]


class SDD(Method):
    name, title, order = 'sdd', 'SDD', 246
    reads = ('feature_map',)
    # The authors' train_origin.py adds --M (a string: its networks compare it with '[1,2,4]') and
    # --warmup to the configuration; SDD_KD keeps mdistiller's KD settings, SDD_DKD its DKD ones.
    references = {
        'sdd_dkd': Reference('SDD-CVPR2024', (
            'DISTILLER.TYPE', 'SDD_DKD', 'DKD.CE_WEIGHT', '{ce_weight}', 'DKD.ALPHA', '{dkd_alpha}',
            'DKD.BETA', '{dkd_nckd}', 'DKD.T', '{temperature}', 'M', "'[{sdd_scales}]'", 'warmup', '{sdd_warmup}')),
        'sdd_kd': Reference('SDD-CVPR2024', (
            'DISTILLER.TYPE', 'SDD_KD', 'KD.TEMPERATURE', '{temperature}', 'KD.LOSS.CE_WEIGHT', '{ce_weight}',
            'KD.LOSS.KD_WEIGHT', '{sdd_beta}', 'M', "'[{sdd_scales}]'", 'warmup', 1))}
    flags = (
        weight('sdd_beta', "scale decoupled distillation: B * the logit loss of --sdd_base between the student's and "
                           "the teacher's region logits (the classifier on each region of the pooled map), "
                           'warmed up linearly'),
        setting('sdd_base', 'dkd', "SDD's logit loss per region: dkd (SDD-DKD, at --dkd_alpha, --dkd_nckd) or kd "
                                   '(SDD-KD), at --temperature', choice(LOSSES), choices=LOSSES),
        setting('sdd_scales', '1,2,4', "SDD's scales: the map is pooled to m x m regions for each m, 1 first",
                choice(SCALES), choices=SCALES),
        setting('sdd_complementary', 2.0, "SDD's weight of the regions where the teacher's prediction is right and "
                                          'its global one wrong, or the reverse (2)',
                not_negative('use a weight >= 0, e.g. 2 (1: every region counts alike)')),
        setting('sdd_warmup', 20, 'epochs over which the SDD weight rises linearly to --sdd_beta (0: none)',
                not_negative('use the epochs over which SDD warms up, e.g. 20, or 0 for none', INTEGER),
                forward=None),  # a weight schedule, applied outside the forward
    )
    examples = {'SDD-DKD': {'sdd_beta': 1}}

    def refuse(self, o, context):
        if o.sdd_beta and o.logit_stand:
            raise UserError('--logit_stand standardises the logits of KD and DKD, and SDD scores regions with the '
                            'classifier as its authors do, unstandardised; drop --logit_stand or --sdd_beta')

    def uses_temperature(self, o):
        return True  # whenever it is on

    def terms(self, b):
        o, p = b.opt, b.run.prefix
        scales = scales_of(o)
        z_s = region_logits(b.s.feature_map, b.params[p + 'fc.weight'], b.params[p + 'fc.bias'], scales)
        z_t = region_logits(b.t.feature_map, b.params['teacher.fc.weight'], b.params['teacher.fc.bias'], scales)
        return {'sdd': sdd_loss(z_s, z_t, b.y, b.temperature, o.sdd_base, o.dkd_alpha, o.dkd_nckd,
                                o.sdd_complementary)}

    def weights(self, o, epoch, epoch_step, stage):
        return {'sdd': warmed_up(o.sdd_beta, o.sdd_warmup, epoch)}

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        from models import zoo
        scales = '1,2' if zoo.family(teacher) == zoo.family(student) else '1,2,4'
        return {'sdd_dkd': {'sdd_beta': 1, 'sdd_base': 'dkd', 'dkd_nckd': SDD_NCKD.get((teacher, student), 8),
                            'temperature': 4, 'sdd_scales': scales, 'sdd_warmup': 20},
                'sdd_kd': {'sdd_beta': 0.9, 'sdd_base': 'kd', 'ce_weight': 0.1, 'temperature': 4,
                           'sdd_scales': scales, 'sdd_warmup': 0}}


METHOD = SDD()

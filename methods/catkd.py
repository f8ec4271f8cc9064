"""Class attention transfer, CAT-KD (Guo, Yan, Li & Lin, "Class Attention Transfer Based Knowledge
Distillation", CVPR 2023), as its authors train it on CIFAR-100: each network's class activation
maps (CAMs), its classifier's weights W (K x C, no bias) as a 1x1 convolution over the map its
classifier pools, average-pooled to r x r (--catkd_size), optionally L2-normalised over the r x r
positions of each class (--catkd_normalize), and compared by their mean squared difference:

    catkd_beta * mean_{b,k,i,j} (A_s - A_t)^2,   A = pool_r(W F)

beside the cross-entropy (weight 1). The authors' networks end in that convolution, without a
bias, and their logits are the CAMs' averages: a run with --catkd_beta holds the student's
classifier bias at zero, untrained, so that its logits are its CAMs' averages too (the teacher's
CAMs leave its bias out likewise). Their per-pair weights and sizes are in CAT_KD below; their
default for a pair they give none: weight 400, size 2, normalised.
"""
import torch.nn.functional as F

from engine.errors import UserError
from engine.rules import SWITCH_RULE
from methods.base import Method, Reference, at_least_one, setting, weight
from methods.formulas import at_least_fp32

# configs/cifar100/CAT_KD/*.yaml of its authors: (weight, CAM size, normalised) per pair.
CAT_KD = {('resnet56', 'resnet20'): (0.7, 2, False), ('resnet110', 'resnet32'): (1.8, 2, False),
          ('resnet32x4', 'resnet8x4'): (15, 2, False), ('wrn_40_2', 'wrn_16_2'): (12, 2, False),
          ('wrn_40_2', 'wrn_40_1'): (1.5, 2, False), ('vgg13', 'vgg8'): (4.5, 2, False),
          ('resnet32x4', 'ShuffleV1'): (600, 4, True), ('resnet32x4', 'ShuffleV2'): (600, 4, True),
          ('wrn_40_2', 'ShuffleV1'): (80, 4, True), ('ResNet50', 'MobileNetV2'): (40, 2, True),
          ('vgg13', 'MobileNetV2'): (15, 2, True)}
DEFAULT = (400, 2, True)


def class_activation_maps(feature_map, fc_weight, size):
    """(B, K, size, size): the map average-pooled to size x size, then each class's weighted sum of
    its channels (pooling and the 1x1 convolution commute; pooling first costs less)."""
    pooled = F.adaptive_avg_pool2d(at_least_fp32(feature_map), size)
    return F.conv2d(pooled, at_least_fp32(fc_weight)[:, :, None, None])


def cat_loss(cam_s, cam_t, normalize=False):
    if normalize:
        cam_s, cam_t = F.normalize(cam_s, dim=(2, 3)), F.normalize(cam_t, dim=(2, 3))
    return (cam_s - cam_t).pow(2).mean()


class CATKD(Method):
    name, title, order = 'catkd', 'CAT-KD', 248
    reads = ('feature_map',)
    # Its train.py converts both networks to ones ending in a 1x1 convolution without bias (its
    # '<arch>_test' networks, the classifier's weight in 'conv_test'): the student's classifier
    # weight is that convolution's, and the bias this suite holds at zero has no counterpart.
    references = {'catkd': Reference('CAT-KD', (
        'DISTILLER.TYPE', 'CAT_KD', 'CAT_KD.LOSS.CE_WEIGHT', '{ce_weight}', 'CAT_KD.LOSS.CAT_loss_weight',
        '{catkd_beta}', 'CAT_KD.LOSS.CAM_RESOLUTION', '{catkd_size}', 'CAT_KD.IF_NORMALIZE', '{catkd_normalize}',
        'if_test', True), parts=((r'student\.fc\.weight', 'distiller.student.conv_test.weight'),))}
    flags = (
        weight('catkd_beta', "class attention transfer: B * the mean squared difference of the student's and the "
                             "teacher's class activation maps (the classifier's weights over the map it pools), "
                             'pooled to --catkd_size; holds the student\'s classifier bias at zero'),
        setting('catkd_size', 2, "CAT-KD's CAM size: the maps are average-pooled to this many positions square",
                at_least_one('use the side of the pooled CAMs, e.g. 2')),
        setting('catkd_normalize', False, "L2-normalise each CAT-KD CAM over its positions", SWITCH_RULE, type=bool),
    )
    examples = {'CAT-KD': {'catkd_beta': 15}}

    def refuse_pair(self, o, nets):
        for who, outputs in (('student', nets.s), ('teacher', nets.t)):
            side = min(outputs.feature_map.shape[2:])
            if o.catkd_size > side:
                raise UserError(f'--catkd_size {o.catkd_size} pools the CAMs to more positions than the {who}\'s '
                                f'{side}x{side} map has; use --catkd_size {side} or less')

    def held_at_zero(self, o):
        return ('fc.bias',) if o.catkd_beta else ()

    def terms(self, b):
        o = b.opt
        cam_s = class_activation_maps(b.s.feature_map, b.params[b.run.prefix + 'fc.weight'], o.catkd_size)
        cam_t = class_activation_maps(b.t.feature_map, b.params['teacher.fc.weight'], o.catkd_size)
        return {'catkd': cat_loss(cam_s, cam_t, o.catkd_normalize)}

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        beta, size, normalize = CAT_KD.get((teacher, student), DEFAULT)
        return {'catkd': {'catkd_beta': beta, 'catkd_size': size, 'catkd_normalize': normalize}}


METHOD = CATKD()

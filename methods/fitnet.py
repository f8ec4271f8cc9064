"""FitNets hints (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015): the student's
middle group, through a learned regressor r, against the teacher's,

    fitnet_beta * mean((r(g_s) - g_t)^2)

r is a 3x3 convolution ('conv', groups of one size) or RepDistiller's hint regressor ConvReg
('convreg': conv, BN, ReLU, strided where the sizes differ), whose weight 100 is the CRD
benchmark's.
"""
import torch.nn.functional as F

from engine.rules import choice
from methods.base import Method, Reference, setting, weight
from methods.formulas import feature_distance
from methods.parts import connectable, convreg, convreg_params, same_size
from utils import conv_params

REGRESSORS = ['conv', 'convreg']


class FitNet(Method):
    name, title, order = 'fitnet', 'FitNet', 40
    references = {'fitnet': Reference('RepDistiller',
                                      ('--distill', 'hint', '-r', 1, '-a', 0, '-b', 100, '--hint_layer', 2),
                                      parts=((r'aux\.fitnet\.(.*)', r'module_list.1.\1'),))}
    flags = (
        weight('fitnet_beta', "FitNets hint: B * MSE between a 3x3 regressor of the student's middle group "
                              "and the teacher's"),
        setting('fitnet_regressor', 'conv', "FitNets' regressor of the student's middle group: conv (a 3x3 conv) "
                                            "or convreg (RepDistiller's hint ConvReg: conv, BN, ReLU, strided where "
                                            "the sizes differ)", choice(REGRESSORS), choices=REGRESSORS),
    )
    examples = {'FitNets hint': {'fitnet_beta': 1},
                'FitNets, ConvReg': {'fitnet_beta': 100, 'fitnet_regressor': 'convreg'}}

    def parts(self, o, nets, run):
        m = len(nets.s.groups) // 2
        s, t = nets.s.groups[m], nets.t.groups[m]
        if o.fitnet_regressor == 'convreg':
            connectable(s, t, m, '--fitnet_beta')
            return {'fitnet': convreg_params(s.shape[1:], t.shape[1:], always=True)}
        same_size(s, t, m, '--fitnet_beta')
        return {'fitnet': {'conv': conv_params(s.shape[1], t.shape[1], 3)}}

    def terms(self, b):
        m = len(b.s.groups) // 2
        if b.opt.fitnet_regressor == 'convreg':  # RepDistiller's hint regressor: conv, BN, ReLU
            hint = F.relu(convreg(b.s.groups[m], b.params, 'aux.fitnet', b.mode))
        else:
            hint = F.conv2d(b.s.groups[m], b.params['aux.fitnet.conv'], padding=1)
        return {'fitnet': feature_distance(hint, b.t.groups[m])}

    def columns(self, table, teacher, student):
        return {'fitnet': {'fitnet_beta': 100, 'fitnet_regressor': 'convreg'}} if table == 'crd' else {}


METHOD = FitNet()

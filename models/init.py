"""How a network's weights start: the AT paper's convention or the CRD benchmark's (RepDistiller).

A network's constructor draws its weights the AT way (utils.py: Kaiming-normal convolutions and
classifier, batch-norm scales uniform in [0, 1), zero shifts), as the original code does for its
WRNs. RepDistiller starts each of its families its own way, and on short runs the difference
decides whether some methods train at all (SP at lr 0.1), so `initialize(params, family, 'crd')`
redraws a network as RepDistiller's models/ do:

    family                    convolutions                    batch norm   classifier
    resnet, bottleneck, wrn   N(0, 2 / fan_out)               1, 0         PyTorch default (wrn: bias 0)
    vgg, mobilenetv2          N(0, 2 / fan_out), bias 0       1, 0         N(0, 0.01), bias 0
    shufflev1, shufflev2      PyTorch default                 1, 0         PyTorch default

fan_out = out channels x kernel area (RepDistiller's kaiming_normal_(mode='fan_out') and its
normal_(0, sqrt(2 / n)) with n = k * k * out_channels are the same draw). PyTorch's default for
a convolution or linear layer is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias.

The roles come from the flat names: a 4-D tensor is a convolution's weight, a tensor whose module
keeps running statistics is a batch norm's, a 2-D one the classifier's; a bias belongs to the
module of its weight. Running statistics stay as constructed (0 and 1).
"""
import math

import torch

INITS = ('auto', 'at', 'crd')
FAN_OUT = 'fan_out'
DEFAULT = 'default'
SMALL = 'small'
CONV = {'resnet': FAN_OUT, 'bottleneck': FAN_OUT, 'wrn': FAN_OUT, 'vgg': FAN_OUT, 'mobilenetv2': FAN_OUT,
        'shufflev1': DEFAULT, 'shufflev2': DEFAULT}
# (classifier weight, classifier bias): DEFAULT draws PyTorch's, SMALL N(0, 0.01), 0.0 zeros
CLASSIFIER = {'resnet': (DEFAULT, DEFAULT), 'bottleneck': (DEFAULT, DEFAULT), 'wrn': (DEFAULT, 0.0),
              'vgg': (SMALL, 0.0), 'mobilenetv2': (SMALL, 0.0), 'shufflev1': (DEFAULT, DEFAULT),
              'shufflev2': (DEFAULT, DEFAULT)}


def resolve(init, arch):
    """The scheme `--init` means for `--arch`: auto is the AT paper's for its WRNs (arch 'wrn'),
    the CRD benchmark's for the networks of its tables."""
    return init if init != 'auto' else ('at' if arch == 'wrn' else 'crd')


def fans(t):
    receptive = t[0][0].numel() if t.dim() > 2 else 1
    return t.shape[1] * receptive, t.shape[0] * receptive


def pytorch_default_(t, fan_in):
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    return t.uniform_(-bound, bound)


def initialize(params, family, scheme):
    """Redraws `params` (a network's flat dict, in place) as `scheme` ('at' leaves the AT draw
    alone, 'crd' is RepDistiller's way for `family`), in the dict's order, from torch's generator.
    Returns `params`."""
    if scheme == 'at':
        return params
    if family not in CONV:
        raise ValueError(f'no CRD initialisation for the {family} family')
    bias_of = {}  # module -> (how its bias starts, the fan-in of its weight), set at its weight
    with torch.no_grad():
        for name, t in params.items():
            module, _, tensor = name.rpartition('.')
            if tensor in ('running_mean', 'running_var'):
                continue
            if module + '.running_mean' in params:  # a batch norm
                t.fill_(1.0 if tensor == 'weight' else 0.0)
            elif t.dim() == 4:
                fan_in, fan_out = fans(t)
                bias_of[module] = (0.0 if CONV[family] == FAN_OUT else DEFAULT, fan_in)
                if CONV[family] == FAN_OUT:
                    t.normal_(0, math.sqrt(2 / fan_out))
                else:
                    pytorch_default_(t, fan_in)
            elif t.dim() == 2:
                fan_in = fans(t)[0]
                bias_of[module] = (CLASSIFIER[family][1], fan_in)
                if CLASSIFIER[family][0] == SMALL:
                    t.normal_(0, 0.01)
                else:
                    pytorch_default_(t, fan_in)
            elif tensor == 'bias' and module in bias_of:
                rule, fan_in = bias_of[module]
                if rule == DEFAULT:
                    pytorch_default_(t, fan_in)
                else:
                    t.fill_(rule)
            else:
                raise ValueError(f'{name}: cannot tell which layer it belongs to')
    return params

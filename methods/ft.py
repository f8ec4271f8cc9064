"""Factor transfer (Kim et al., "Paraphrasing Complex Network", NeurIPS 2018), as RepDistiller
trains it. In an init stage (--init_epochs, 30 by default) a paraphraser learns to reconstruct the
teacher's last group from a factor of it (an encoder and a decoder of 3x3 convolutions,
'aux.ft.paraphraser', trained alone on the reconstruction's MSE: the student does not run).
In the main stage a translator maps the student's last group to a factor of its own
('aux.ft.translator', trained with the student), compared with the fixed paraphraser's factor of
the teacher's:

    ft_beta * mean |F(translator(g_s)) - F(paraphraser(g_t))|,   F(x) = at(x), the normalised attention map

(eq. 3 with p = 1, RepDistiller's factor()). RepDistiller's weight: 200, the init stage at lr 0.01
for ResNet and WRN students.
"""
import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.rules import NUMBER, Rule
from methods.at import at
from methods.base import Method, Reference, setting, weight
from methods.formulas import at_least_fp32, same_resolution
from methods.parts import conv_with_bias, transposed_conv_with_bias, unit_bnparams
from utils import batch_norm


def ft_loss(factor_s, factor_t):
    """The mean absolute difference of the two factors' normalised maps, the larger factor pooled
    to the other's size first."""
    factor_s, factor_t = same_resolution(factor_s, factor_t)
    return (at(factor_s) - at(factor_t)).abs().mean()


def factor_channels(c_t, rate):
    """Channels of FT's factors: int(rate * the teacher's channels), RepDistiller's k = 0.5."""
    return int(c_t * rate)


def paraphraser_params(c_t, rate):
    """RepDistiller's Paraphraser (without batch norms, as it builds it): an encoder of three 3x3
    convolutions c_t -> c_t -> m -> m and a decoder of three 3x3 transposed convolutions
    m -> m -> c_t -> c_t, each with bias and followed by LeakyReLU(0.1); m = factor_channels."""
    m = factor_channels(c_t, rate)
    widths = [(c_t, c_t), (c_t, m), (m, m)]
    encoder = {f'conv{i}': conv_with_bias(c_in, c_out, 3) for i, (c_in, c_out) in enumerate(widths)}
    decoder = {f'deconv{i}': transposed_conv_with_bias(c_in, c_out, 3)
               for i, (c_out, c_in) in enumerate(reversed(widths))}
    return {**encoder, **decoder}


def paraphrase(x, params, base):
    """The factor of the teacher's group x: the encoder of the paraphraser at `base`."""
    for i in range(3):
        x = F.leaky_relu(F.conv2d(x, params[f'{base}.conv{i}.weight'], params[f'{base}.conv{i}.bias'], padding=1), 0.1)
    return x


def reconstruct(factor, params, base):
    """The teacher's group again from its factor: the decoder of the paraphraser at `base`."""
    x = factor
    for i in range(3):
        x = F.leaky_relu(F.conv_transpose2d(x, params[f'{base}.deconv{i}.weight'], params[f'{base}.deconv{i}.bias'],
                                            padding=1), 0.1)
    return x


def translator_params(c_s, c_t, rate):
    """RepDistiller's Translator: three 3x3 convolutions c_s -> c_s -> m -> m, each with bias,
    a batch norm and LeakyReLU(0.1); m = factor_channels of the teacher's group."""
    m = factor_channels(c_t, rate)
    params = {}
    for i, (c_in, c_out) in enumerate([(c_s, c_s), (c_s, m), (m, m)]):
        params.update({f'conv{i}': conv_with_bias(c_in, c_out, 3), f'bn{i}': unit_bnparams(c_out)})
    return params


def layers(part, kind, sequential, offset=0):
    """Our `aux.ft.<part>.<kind><i>` in RepDistiller's nn.Sequential `sequential`, whose layers
    take 3 entries each (convolution, batch norm or an empty Sequential, LeakyReLU)."""
    return (rf'aux\.ft\.{part}\.{kind}(\d)\.(.*)', lambda m: f'{sequential}.{3 * int(m[1]) + offset}.{m[2]}')


def translate(x, params, base, mode):
    """The student's factor of its group x, by the translator at `base`."""
    for i in range(3):
        x = F.conv2d(x, params[f'{base}.conv{i}.weight'], params[f'{base}.conv{i}.bias'], padding=1)
        x = F.leaky_relu(batch_norm(x, params, f'{base}.bn{i}', mode), 0.1)
    return x


class FT(Method):
    name, title, order = 'ft', 'FT', 170
    references = {'ft': Reference(
        'RepDistiller', ('--distill', 'factor', '-r', 1, '-a', 0, '-b', 200), init=True,
        parts=(layers('paraphraser', 'conv', 'module_list.2.encoder'),
               layers('paraphraser', 'deconv', 'module_list.2.decoder'),
               layers('translator', 'conv', 'module_list.1.encoder'),
               layers('translator', 'bn', 'module_list.1.encoder', 1)),
        init_parts=(layers('paraphraser', 'conv', 'init_modules.0.encoder'),
                    layers('paraphraser', 'deconv', 'init_modules.0.decoder')))}
    flags = (
        weight('ft_beta', "factor transfer: B * FT between a learned translator's factor of the student's last group "
                          "and the factor of the teacher's by a paraphraser, itself trained in the init stage to "
                          "reconstruct that group (RepDistiller's weight: 200)"),
        setting('ft_rate', 0.5, "FT's factor channels per channel of the teacher's last group (RepDistiller's k: 0.5)",
                Rule(NUMBER, lambda v: 0 < v <= 1, 'is outside (0, 1]',
                     "use FT's factor channels per teacher channel, e.g. 0.5 (RepDistiller's k)")),
    )
    init_stage = 'parts'  # its paraphraser trains alone there
    examples = {'FT': {'ft_beta': 200}}

    def refuse_pair(self, o, nets):
        c_t = nets.t.groups[-1].shape[1]
        if factor_channels(c_t, o.ft_rate) < 1:
            raise UserError(f'--ft_rate {o.ft_rate:g} gives FT\'s factors no channels from the teacher\'s {c_t}; '
                            f'use a rate of at least {1 / c_t:.3g}, e.g. 0.5')

    def parts(self, o, nets, run):
        c_s, c_t = nets.s.groups[-1].shape[1], nets.t.groups[-1].shape[1]
        return {'ft': {'paraphraser': paraphraser_params(c_t, o.ft_rate),
                       'translator': translator_params(c_s, c_t, o.ft_rate)}}

    def term_names(self, o, run, stage):
        return ['reconstruction'] if stage == 'init' else ['ft']

    def terms(self, b):
        """The paraphraser, which the init stage trained, stays fixed now."""
        with torch.no_grad():
            factor_t = paraphrase(b.t.groups[-1], b.params, 'aux.ft.paraphraser')
        return {'ft': ft_loss(translate(b.s.groups[-1], b.params, 'aux.ft.translator', b.mode), factor_t)}

    def init_terms(self, b):
        g_t = b.t.groups[-1]
        reconstruction = reconstruct(paraphrase(g_t, b.params, 'aux.ft.paraphraser'), b.params, 'aux.ft.paraphraser')
        return {'reconstruction': F.mse_loss(at_least_fp32(reconstruction), at_least_fp32(g_t))}

    def weights(self, o, epoch, epoch_step, stage):
        return {'reconstruction': 1.0} if stage == 'init' else {'ft': o.ft_beta}  # RepDistiller's plain MSE

    def columns(self, table, teacher, student):
        if table != 'crd':
            return {}
        # RepDistiller's init stage of FT runs at lr 0.01 for its ResNet and WRN students
        return {'ft': {'ft_beta': 200, **({'init_lr': 0.01} if student.startswith(('resnet', 'wrn')) else {})}}


METHOD = FT()

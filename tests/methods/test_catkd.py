"""CAT-KD (methods/catkd.py): its class activation maps and loss against the paper's formula
written out class by class and position by position, in float64; the student's classifier bias it
holds at zero; its refusal of CAMs larger than a network's map."""
import argparse

import pytest
import torch
from test_registry import options, wrn_pair

import methods
from engine.errors import UserError
from engine.members import join_networks
from methods.catkd import METHOD, cat_loss, class_activation_maps


def draw(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize('normalize', [False, True])
def test_catkd_is_its_formula_written_out(normalize):
    """A_bk(i, j) = sum_c W_kc mean of channel c over block (i, j); optionally each A_bk divided by
    its L2 norm over the positions; then the mean of (A_s - A_t)^2 over b, k, i, j."""
    f_s, f_t, w_s, w_t = draw(0, 2, 3, 4, 4), draw(1, 2, 5, 4, 4), draw(2, 6, 3), draw(3, 6, 5)

    def cams(f, w):
        out = []
        for b in range(2):
            for k in range(6):
                a = [[sum(w[k, c].item() * f[b, c, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean().item()
                          for c in range(f.shape[1])) for j in range(2)] for i in range(2)]
                if normalize:
                    norm = sum(v * v for row in a for v in row) ** 0.5
                    a = [[v / norm for v in row] for row in a]
                out += [v for row in a for v in row]
        return out
    expected = sum((s - t) ** 2 for s, t in zip(cams(f_s, w_s), cams(f_t, w_t))) / (2 * 6 * 2 * 2)
    cam_s, cam_t = class_activation_maps(f_s, w_s, 2), class_activation_maps(f_t, w_t, 2)
    assert cam_s.shape == (2, 6, 2, 2)
    assert abs(cat_loss(cam_s, cam_t, normalize).item() - expected) < 1e-12 * expected


def test_a_catkd_run_holds_the_students_classifier_bias_at_zero():
    """Its logits are then the averages of its CAMs (the authors' bias-free networks)."""
    f_s, p_s, teacher = wrn_pair()
    opt = options(catkd_beta=1.0)
    objective, params = join_networks(opt, f_s, p_s, teacher)
    bias = params['student.fc.bias']
    assert not bias.requires_grad and not bias.any()
    x = draw(4, 2, 3, 32, 32)
    logits, _ = objective(x, torch.tensor([0, 1]), params, False)
    s = objective.student(x, params, False)
    torch.testing.assert_close(logits, class_activation_maps(s.feature_map, params['student.fc.weight'], 1).flatten(1))
    _, plain = join_networks(options(), *wrn_pair()[:2])
    assert plain['fc.bias'].requires_grad  # without CAT-KD the bias trains as ever


def test_catkd_refuses_cams_larger_than_a_map_in_one_line():
    nets = methods.probe('resnet32x4', 'MobileNetV2')  # MobileNetV2's map is 2x2 at 32 pixels
    with pytest.raises(UserError, match="^--catkd_size 4 pools .* than the student's 2x2 map has; use --catkd_size 2"):
        METHOD.refuse_pair(argparse.Namespace(catkd_size=4), nets)
    METHOD.refuse_pair(argparse.Namespace(catkd_size=2), nets)

"""MLKD (methods/mlkd.py) against its formula written out by hand, and the strong view of the data
pipeline it reads (datasets/strong_view.py): Pillow's operations, a view that depends only on
(seed, epoch, batch), runs that do not read it unchanged, a resumed run equal to an uninterrupted
one, and the refusal on ImageNet."""
import math
import signal

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import cifar
import imagenet
from conftest import make_image_tree, run_in_process
from datasets import strong_view as sv
from datasets.cifar import Loader
from engine.errors import UserError
from methods.mlkd import mlkd_terms
from test_cifar import checkpoint, log_lines, ok
from test_stages import stop_at


def softmax(row, T):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def by_hand(z_s, z_t, z_s2, z_t2, labels, T0):
    """The authors' combination, one number at a time."""
    B, C = len(z_s), len(z_s[0])
    temps = [T0, 3.0, 5.0, 2.0, 6.0]

    def instance(s, t, T):
        total = 0.0
        for i in range(B):
            p, q = softmax(s[i], T), softmax(t[i], T)
            total += sum(q[c] * (math.log(q[c]) - math.log(p[c])) for c in range(C))
        return T * T * total / B

    def gram(P, rows):  # rows: sample relations (B x B), else class relations (C x C)
        n, m = (B, C) if rows else (C, B)
        at = (lambda a, b: P[a][b]) if rows else (lambda a, b: P[b][a])
        return [[sum(at(i, k) * at(j, k) for k in range(m)) for j in range(n)] for i in range(n)]

    def relation(s, t, T, rows):
        P_s, P_t = [softmax(r, T) for r in s], [softmax(r, T) for r in t]
        G_s, G_t = gram(P_s, rows), gram(P_t, rows)
        return sum((a - b) ** 2 for r_t, r_s in zip(G_t, G_s) for a, b in zip(r_t, r_s)) / (B if rows else C)

    probs = [softmax(r, 1.0) for r in z_t]
    confidence = [max(p) for p in probs]
    in_class = [sum(p[c] for p in probs) for c in range(C)]
    rho = sum(v <= np.percentile(confidence, 50) for v in confidence) / B
    rho_c = sum(v <= np.percentile(in_class, 50) for v in in_class) / C
    ce = sum(math.log(sum(math.exp(v) for v in z_s2[i])) - z_s2[i][labels[i]] for i in range(B)) / B
    return {'mlkd_ce': ce,
            'mlkd_instance': rho * sum(instance(z_s, z_t, T) for T in temps)
            + sum(instance(z_s2, z_t2, T) for T in temps[:3]) + sum(instance(z_s, z_t, T) for T in temps[3:]),
            'mlkd_batch': rho * sum(relation(z_s, z_t, T, True) for T in temps),
            'mlkd_class': rho_c * sum(relation(z_s, z_t, T, False) for T in temps)}


def test_the_terms_are_the_authors_combination_of_the_three_levels():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 5, dtype=torch.float64, generator=g) * 3 for _ in range(4)]
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    got = mlkd_terms(*z, labels, 4.0)
    want = by_hand(*[v.tolist() for v in z], labels.tolist(), 4.0)
    assert list(got) == list(want)
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], rel=1e-12), name
    # half the samples and classes at or below the median: each masked term weighs one half
    assert 0 < want['mlkd_batch'] and 0 < want['mlkd_class']


def pillow(x, f):
    im = Image.fromarray(x.permute(1, 2, 0).numpy())
    return torch.from_numpy(np.array(f(im))).permute(2, 0, 1)


@pytest.mark.parametrize('name, level, reference', [
    ('autocontrast', 0, ImageOps.autocontrast), ('equalize', 0, ImageOps.equalize),
    ('brightness', 0.3, lambda im: ImageEnhance.Brightness(im).enhance(0.3)),
    ('color', 0.3, lambda im: ImageEnhance.Color(im).enhance(0.3)),
    ('contrast', 0.7, lambda im: ImageEnhance.Contrast(im).enhance(0.7)),
    ('sharpness', 0.2, lambda im: ImageEnhance.Sharpness(im).enhance(0.2)),
    ('posterize', 5.6, lambda im: ImageOps.posterize(im, 5)),
    ('solarize', 99.5, lambda im: ImageOps.solarize(im, 99.5)),
    ('translate_x', 0.25, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 8, 0, 1, 0))),
    ('translate_y', -0.125, lambda im: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, -4)))])
def test_each_operation_is_pillows(name, level, reference):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, :12] //= 3  # a histogram that is not flat
    assert torch.equal(sv.APPLY[name](x[None], torch.tensor([float(level)]))[0], pillow(x, reference))


def test_the_strong_view_depends_on_seed_epoch_and_batch_only_and_leaves_the_batches_alone():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(40) % 10
    plain, strong = Loader(x, y, 16, train=True, seed=3), Loader(x, y, 16, train=True, seed=3, strong_view=True)
    for loader in (plain, strong):
        loader.set_epoch(2)
    a, b = list(plain), list(strong)
    assert [len(t) for t in a] == [4] * 3 and [len(t) for t in b] == [5] * 3
    for p, q in zip(a, b):
        # the runs that do not read it see the same batches
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) and p[2] == q[2] and torch.equal(p[3], q[3])
        assert q[4].shape == q[0].shape and not torch.equal(q[4], q[0])
    strong.set_epoch(2, skip=2)  # a resumed epoch
    assert torch.equal(next(iter(strong))[4], b[2][4])
    strong.set_epoch(3)
    assert not torch.equal(next(iter(strong))[4], b[0][4])


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp('mlkd')
    make_image_tree(str(d / 'data'), n_train=32, n_test=16)
    ok(run_in_process(cifar.main, *RUN, '--epochs', 1, '--seed', 1, '--save', 'logs/teacher', cwd=d))
    return d


RUN = ['--dataroot', 'data', '--depth', 10, '--width', 0.5, '--batch_size', 16, '--nthread', 1, '--epochs', 2,
       '--epoch_step', '[2]', '--dtype', 'double', '--reference', '--tensorboard', 'off']
MLKD = ['--teacher_id', 'teacher', '--mlkd_beta', 0.9, '--ce_weight', 0.1]


def test_a_run_resumed_in_the_middle_of_an_epoch_ends_where_an_uninterrupted_one_does(workdir):
    ok(run_in_process(cifar.main, *RUN, *MLKD, '--seed', 4, '--save', 'logs/straight', cwd=workdir))
    stopped = run_in_process(stop_at(cifar.main, step=3), *RUN, *MLKD, '--seed', 4, '--save', 'logs/split',
                             cwd=workdir)
    assert stopped.returncode == 128 + signal.SIGTERM and 'at epoch 2, step 1' in stopped.stderr, stopped.stderr
    ok(run_in_process(cifar.main, '--resume', 'logs/split', cwd=workdir))
    a, b = checkpoint(workdir / 'logs/straight')['params'], checkpoint(workdir / 'logs/split')['params']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    line, other = log_lines(workdir / 'logs/straight')[-1], log_lines(workdir / 'logs/split')[-1]
    assert line['mlkd_instance_loss'] == other['mlkd_instance_loss'] and line['test_acc'] == other['test_acc']
    assert {k: v for k, v in line['loss_weights'].items() if v} == {
        'distillation': 0.1, 'mlkd_ce': 0.1, 'mlkd_instance': 0.9, 'mlkd_batch': 0.9, 'mlkd_class': 0.9}


def test_a_cohort_member_that_does_not_read_the_strong_view_trains_as_it_does_alone(workdir):
    kd = ['--teacher_id', 'teacher', '--alpha', 0.9]
    ok(run_in_process(cifar.main, *RUN, *kd, '--epochs', 1, '--seed', 5, '--save', 'logs/kd_alone', cwd=workdir))
    members = '[{"name": "kd", "alpha": 0.9, "seed": 5}, {"name": "mlkd", "mlkd_beta": 0.9, "ce_weight": 0.1}]'
    ok(run_in_process(cifar.main, *RUN, '--epochs', 1, '--teacher_id', 'teacher', '--seed', 5, '--data_seed', 5,
                      '--cohort', members, '--save', 'logs/row', cwd=workdir))
    a, b = checkpoint(workdir / 'logs/kd_alone')['params'], checkpoint(workdir / 'logs/row/kd')['params']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_refuses_the_strong_view_in_one_line(tmp_path):
    with pytest.raises(UserError, match='strongly augmented second view of each batch, which imagenet.py does not'):
        imagenet.parse_args(['--imagenetpath', str(tmp_path), '--save', str(tmp_path / 'run'), '--teacher_params',
                             'r34.pth', '--mlkd_beta', '0.9'])


def test_the_columns_carry_the_authors_settings_per_pair():
    from methods.mlkd import METHOD
    columns = METHOD.columns('crd', 'resnet32x4', 'resnet8x4')
    assert columns['mlkd'] == {'mlkd_beta': 0.9, 'ce_weight': 0.1, 'temperature': 4}
    assert columns['mlkd_ls'] == {'mlkd_beta': 9, 'ce_weight': 0.1, 'temperature': 2, 'logit_stand': True}
    assert METHOD.columns('crd', 'vgg13', 'vgg8')['mlkd_ls']['mlkd_beta'] == 6
    assert METHOD.columns('table1', 'wrn_16_2', 'wrn_16_1') == {}

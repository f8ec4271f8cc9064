"""ReviewKD and OFD as main-stage terms: their learned parts and terms (methods/reviewkd.py,
methods/ofd.py) against fp64 transcriptions of mdistiller's ReviewKD and OFD distillers, their weights, and both
methods through cifar.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from engine.errors import UserError
from engine.members import join_networks
from methods import reviewkd
from methods.ofd import ofd_margin
from methods.parts import connector_params
from models import zoo
from test_cifar import TINY, checkpoint, log_lines, ok
from test_transfer import as_double, assert_sum_trains_student_not_teacher, double_pair, options, workdir  # noqa: F401
from utils import flatten

# ----------------------------------------------------------------------------------------------
# mdistiller's ReviewKD (mdistiller/distillers/ReviewKD.py) and OFD (OFD.py), transcribed as
# torch modules in fp64: the references the functional forms here are checked against.


class ReferenceABF(nn.Module):
    def __init__(self, c_in, c_mid, c_out, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.conv2 = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode='nearest')
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode='nearest')
        return self.conv2(x), x


def reference_review(abfs, features, shapes, out_shapes):
    """ReviewKD.forward_train's fusion: abfs, shapes and out_shapes deepest level first."""
    x = features[::-1]
    out, residual = abfs[0](x[0], out_shape=out_shapes[0])
    results = [out]
    for f, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out, residual = abf(f, residual, shape, out_shape)
        results.insert(0, out)
    return results


def reference_hcl(fstudent, fteacher):
    total = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for level in [4, 2, 1]:
            if level >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def load_bn(bn, params, base):
    with torch.no_grad():
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            getattr(bn, name).copy_(params[f'{base}.{name}'])


def reference_abfs(params, base, n_levels):
    """mdistiller's ABF modules (deepest first, as its self.abfs) holding the weights of
    params[base + '.abf<i>']."""
    abfs = []
    for i in reversed(range(n_levels)):
        b = f'{base}.abf{i}'
        c_mid, c_in = params[b + '.conv1'].shape[:2]
        abf = ReferenceABF(c_in, c_mid, params[b + '.conv2'].shape[0], b + '.att.weight' in params).double()
        with torch.no_grad():
            abf.conv1[0].weight.copy_(params[b + '.conv1'])
            abf.conv2[0].weight.copy_(params[b + '.conv2'])
            if abf.att_conv is not None:
                abf.att_conv[0].weight.copy_(params[b + '.att.weight'])
                abf.att_conv[0].bias.copy_(params[b + '.att.bias'])
        load_bn(abf.conv1[1], params, b + '.bn1')
        load_bn(abf.conv2[1], params, b + '.bn2')
        abfs.append(abf)
    return abfs


def randomise_bns_(params, prefix='aux.'):
    """BN entries (under `prefix`) away from their initial values, so that using the wrong one shows."""
    g = torch.Generator().manual_seed(5)
    for k, v in params.items():
        if not k.startswith(prefix):
            continue
        if k.endswith(('.weight', '.bias')) and '.bn' in k or k.endswith('running_mean'):
            v.data.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype))
        elif k.endswith('running_var'):
            v.data.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
    return params


def double(params):
    return {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# ReviewKD's ABF modules

def test_abf_parameters_follow_mdistiller():
    torch.manual_seed(0)
    aux = reviewkd.reviewkd_params([8, 16, 32, 32], [16, 32, 64, 64])
    # the width is min(512, the student's pooled channels): 32; the deepest level does not fuse
    assert [tuple(aux[f'abf{i}']['conv1'].shape) for i in range(4)] == [(32, 8, 1, 1), (32, 16, 1, 1),
                                                                      (32, 32, 1, 1), (32, 32, 1, 1)]
    assert [tuple(aux[f'abf{i}']['conv2'].shape) for i in range(4)] == [(16, 32, 3, 3), (32, 32, 3, 3),
                                                                      (64, 32, 3, 3), (64, 32, 3, 3)]
    assert ['att' in aux[f'abf{i}'] for i in range(4)] == [True, True, True, False]
    assert tuple(aux['abf0']['att']['weight'].shape) == (2, 64, 1, 1)
    assert reviewkd.reviewkd_params([8, 600], [8, 600])['abf0']['conv1'].shape[0] == 512
    assert reviewkd.reviewkd_params([8, 32], [8, 32], 16)['abf0']['conv1'].shape[0] == 16
    for i in range(4):
        bn = aux[f'abf{i}']['bn2']
        assert bn['weight'].eq(1).all() and bn['bias'].eq(0).all()
    # kaiming_uniform with a = 1: uniform in +-sqrt(3 / fan_in), the gain sqrt(2 / (1 + a^2)) being 1
    for name, fan_in in [('conv1', 32), ('conv2', 32 * 9)]:
        w, bound = aux['abf3'][name], math.sqrt(3 / fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name


@pytest.mark.parametrize('mode', [True, False])
@pytest.mark.parametrize('student_sizes', [(32, 16, 8), (16, 8, 4)])
def test_review_is_mdistillers_abf_fusion(mode, student_sizes):
    """The fused outputs (and, in training, the BN statistics they update) equal those of
    mdistiller's ABF modules on the same weights, in fp64; student levels at the teacher's sizes
    and at half of them (ShuffleNet's 16, 8, 4 against a ResNet: the outputs are upsampled)."""
    torch.manual_seed(1)
    channels_s, channels_t, sizes_t = [4, 8, 12, 12], [6, 10, 14, 14], [32, 16, 8, 1]
    params = randomise_bns_(double(flatten(reviewkd.reviewkd_params(channels_s, channels_t, 6), 'aux.reviewkd.')))
    features = [torch.randn(3, c, s, s, dtype=torch.float64) for c, s in zip(channels_s, [*student_sizes, 1])]
    abfs = reference_abfs(params, 'aux.reviewkd', 4)
    for abf in abfs:
        abf.train(mode)
    expected = reference_review(abfs, features, [1, *student_sizes[::-1]], sizes_t[::-1])
    outputs = reviewkd.review(features, params, 'aux.reviewkd', mode, [(s, s) for s in sizes_t])
    assert [tuple(o.shape) for o in outputs] == [(3, c, s, s) for c, s in zip(channels_t, sizes_t)]
    for o, e in zip(outputs, expected):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    for i, abf in enumerate(abfs[::-1]):
        for bn, base in [(abf.conv1[1], 'bn1'), (abf.conv2[1], 'bn2')]:
            torch.testing.assert_close(params[f'aux.reviewkd.abf{i}.{base}.running_mean'], bn.running_mean,
                                       rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# OFD's connectors and margins

def test_ofd_connectors_follow_mdistiller():
    torch.manual_seed(0)
    aux = {f'ofd{g}': connector_params(c_s, c_t) for g, (c_s, c_t) in enumerate([(32, 64), (64, 128)])}
    assert {g: (tuple(p['conv'].shape), tuple(p['bn']['weight'].shape)) for g, p in aux.items()} == {
        'ofd0': ((64, 32, 1, 1), (64,)), 'ofd1': ((128, 64, 1, 1), (128,))}
    # ConnectorConvBN: normal with std sqrt(2 / (k * k * out_channels)), BN scale 1 and shift 0
    for g, c_t in [('ofd0', 64), ('ofd1', 128)]:
        assert abs(aux[g]['conv'].std().item() / math.sqrt(2 / c_t) - 1) < 0.1
        assert aux[g]['bn']['weight'].eq(1).all() and aux[g]['bn']['bias'].eq(0).all()


# ----------------------------------------------------------------------------------------------
# The terms against mdistiller's forward_train

def teacher_preact(x, params, f_t):
    """mdistiller's wrn preact_feats[1:]: each group through the BN the next block (or the final
    bn) applies to it, in inference mode, written out without the network's preact=True."""
    with torch.no_grad():
        _, g_t, f = f_t(x, params, 'teacher.', pooled=True)
    names = ('group1.block0.bn0', 'group2.block0.bn0', 'bn')
    return [F.batch_norm(g, params[f'teacher.{n}.running_mean'], params[f'teacher.{n}.running_var'],
                         params[f'teacher.{n}.weight'], params[f'teacher.{n}.bias'], False)
            for g, n in zip(g_t, names)], f


def test_reviewkd_term_is_mdistillers_forward():
    """WRN-10-0.5 (8/16/32 channels) from WRN-16-1 (16/32/64): HCL over mdistiller's ABF fusion of
    the student's groups and pooled feature against the teacher's pre-ReLU groups and pooled
    feature, in training mode, with the BN statistics it updates; the sum trains student and ABFs."""
    opt = options('--teacher_id', 't', '--reviewkd_beta', 5, '--reviewkd_mid_channels', 16)
    f_s, p_s, teacher = double_pair(0.5)
    transfer, params = join_networks(opt, f_s, p_s, teacher)
    params = randomise_bns_(as_double(params))
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    abfs = reference_abfs(params, 'aux.reviewkd', 4)  # before the term updates the statistics
    assert params['aux.reviewkd.abf0.conv1'].shape == (16, 8, 1, 1)
    _, terms = transfer(x, y, params, True)
    with torch.no_grad():
        _, g_s, pooled_s = f_s(x, params, True, 'student.', pooled=True)  # batch statistics: same outputs
        targets, pooled_t = teacher_preact(x, params, teacher[0])
        fused = reference_review(abfs, [*g_s, pooled_s[:, :, None, None]], [1, 8, 16, 32], [1, 8, 16, 32])
        expected = reference_hcl(fused, [*targets, pooled_t[:, :, None, None]])
    assert list(terms) == transfer.term_names() and expected > 0
    torch.testing.assert_close(terms['reviewkd'], expected, rtol=1e-12, atol=0)
    for i, abf in enumerate(abfs[::-1]):
        torch.testing.assert_close(params[f'aux.reviewkd.abf{i}.bn2.running_var'], abf.conv2[1].running_var,
                                   rtol=1e-12, atol=0)
    assert_sum_trains_student_not_teacher(transfer, terms, params)


def test_reviewkd_weight_warms_up_and_its_settings_enter_the_forward():
    from engine.training import forward_options
    transfer, _ = join_networks(options('--teacher_id', 't', '--reviewkd_beta', 5, '--reviewkd_warmup', 4),
                                *double_pair(0.5))
    assert [transfer.weights(e, [])['reviewkd'] for e in range(1, 7)] == [1.25, 2.5, 3.75, 5, 5, 5]
    transfer, _ = join_networks(options('--teacher_id', 't', '--reviewkd_beta', 5, '--reviewkd_warmup', 0),
                                *double_pair(0.5))
    assert transfer.weights(1, []) == {'distillation': 1, 'at': 0, 'reviewkd': 5}
    base = forward_options(options('--teacher_id', 't', '--reviewkd_beta', 5))
    assert forward_options(options('--teacher_id', 't', '--reviewkd_beta', 1, '--reviewkd_warmup', 3)) == base
    assert forward_options(options('--teacher_id', 't', '--reviewkd_beta', 5,
                                   '--reviewkd_mid_channels', 64)) != base


def test_reviewkd_brings_smaller_student_levels_to_the_teachers_sizes():
    """A ShuffleNet student (groups at 16, 8, 4) from a WRN (32, 16, 8), as the authors' code pairs them."""
    torch.manual_seed(0)
    f_s, p_s = zoo.network('ShuffleV1', 10)
    _, _, teacher = double_pair(0.5)
    transfer, params = join_networks(options('--teacher_id', 't', '--reviewkd_beta', 1), f_s, as_double(p_s), teacher)
    params = as_double(params)
    _, terms = transfer(torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1]), params, True)
    assert torch.isfinite(terms['reviewkd']) and terms['reviewkd'] > 0
    assert params['aux.reviewkd.abf0.conv2'].shape[0] == 16  # to the teacher's width


def reference_margin(bn_weight, bn_bias):
    """mdistiller's OFD.init_ofd_modules, channel by channel."""
    from scipy.stats import norm
    margin = []
    for s, m in zip(bn_weight.tolist(), bn_bias.tolist()):
        s = abs(s)
        if norm.cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=torch.float64)


def reference_feat_loss(source, target, margin):
    margin = margin.view(1, -1, 1, 1)
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin)).double()
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).double()
            + (source - target) ** 2 * (target > 0).double())
    return torch.abs(loss).mean(dim=0).sum()


def test_ofd_term_is_mdistillers_arithmetic():
    """The margins are mdistiller's of the teacher's BNs before each ReLU (some channels so far
    on the positive side that the -3 |scale| branch is taken); the term is its ofd_loss over the
    connected pre-ReLU groups, weighted 1/4, 1/2, 1, in training mode."""
    f_s, p_s, (f_t, p_t) = double_pair(0.5)
    p_t['bn.bias'][:8] = 4.0
    p_t['group1.block0.bn0.bias'][:4] = -1.0
    transfer, params = join_networks(options('--teacher_id', 't', '--ofd_beta', 1e-3), f_s, p_s, (f_t, p_t))
    params = randomise_bns_(as_double(params))
    names = ('group1.block0.bn0', 'group2.block0.bn0', 'bn')
    margins = [reference_margin(params[f'teacher.{n}.weight'], params[f'teacher.{n}.bias']) for n in names]
    assert (margins[2][:8] == -3 * params['teacher.bn.weight'][:8].abs()).all()
    for g, m in enumerate(margins):
        torch.testing.assert_close(params[f'aux.ofd{g}.margin'], m, rtol=1e-12, atol=1e-12)
        assert not params[f'aux.ofd{g}.margin'].requires_grad
    connectors = []
    for g in range(3):
        c_t, c_s = params[f'aux.ofd{g}.conv'].shape[:2]
        c = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t)).double()
        with torch.no_grad():
            c[0].weight.copy_(params[f'aux.ofd{g}.conv'])
        load_bn(c[1], params, f'aux.ofd{g}.bn')
        connectors.append(c)
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    _, terms = transfer(x, y, params, True)
    with torch.no_grad():
        _, g_s = f_s(x, params, True, 'student.')
        # the student's pre-ReLU groups in training mode: its BNs before the ReLUs on batch statistics
        p_s = [F.batch_norm(g, None, None, params[f'student.{n}.weight'], params[f'student.{n}.bias'], True)
               for g, n in zip(g_s, names)]
        targets, _ = teacher_preact(x, params, f_t)
        expected = sum(reference_feat_loss(c(s), F.adaptive_avg_pool2d(t, s.shape[-2:]), m) / 2 ** (3 - i - 1)
                       for i, (c, s, t, m) in enumerate(zip(connectors, p_s, targets, margins)))
    assert list(terms) == transfer.term_names() and expected > 0
    torch.testing.assert_close(terms['ofd'], expected, rtol=1e-12, atol=0)
    assert transfer.weights(1, []) == {'distillation': 1, 'at': 0, 'ofd': 1e-3}
    assert_sum_trains_student_not_teacher(transfer, terms, params)


def test_ofd_refuses_groups_of_other_sizes_and_teachers_without_its_batch_norms():
    torch.manual_seed(0)
    f_s, p_s = zoo.network('ShuffleV1', 10)
    _, _, teacher = double_pair(0.5)
    with pytest.raises(UserError, match=r'--ofd_beta compares outputs of group 0, which are \(16, 16\) in the '
                                        r'student and \(32, 32\) in the teacher'):
        join_networks(options('--teacher_id', 't', '--ofd_beta', 1), f_s, as_double(p_s), teacher)
    f_s, p_s, (f_t, p_t) = double_pair(0.5)

    def shufflenet_like(*args, **kw):  # a teacher that names no BN before its ReLUs
        return f_t(*args, **kw)
    shufflenet_like.bn_before_relu = None
    with pytest.raises(UserError, match="--ofd_beta takes its margins from the batch norms before the teacher's"):
        join_networks(options('--teacher_id', 't', '--ofd_beta', 1), f_s, p_s, (shufflenet_like, p_t))


# ----------------------------------------------------------------------------------------------
# Through cifar.py

def test_reviewkd_and_ofd_train_through_the_cli(image_tree, workdir):  # noqa: F811
    """One run with both: each term logged every epoch, ReviewKD's weight warming up, the ABF
    modules and OFD's margins (those of the teacher's BNs) in the checkpoint."""
    ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', 2, '--seed', 5, '--dataroot', image_tree,
               '--teacher_id', 'teacher', '--reviewkd_beta', 5, '--reviewkd_warmup', 2, '--ofd_beta', 1e-3,
               '--save', 'logs/reviewkd_ofd', cwd=workdir))
    log = log_lines(workdir / 'logs/reviewkd_ofd')
    for r in log:
        for name in ('reviewkd', 'ofd'):
            mean, std = r[f'{name}_loss']
            assert math.isfinite(mean) and mean > 0 and std > 0, name
    assert [(r['loss_weights']['reviewkd'], r['loss_weights']['ofd']) for r in log] == [(2.5, 1e-3), (5, 1e-3)]
    params = checkpoint(workdir / 'logs/reviewkd_ofd')['params']
    assert {f'aux.reviewkd.abf{i}.conv2' for i in range(4)} <= set(params)
    for g, n in enumerate(('group1.block0.bn0', 'group2.block0.bn0', 'bn')):
        torch.testing.assert_close(params[f'aux.ofd{g}.margin'],
                                   ofd_margin(params[f'teacher.{n}.weight'], params[f'teacher.{n}.bias']))


def test_ofd_teacher_train_runs_the_teacher_on_batch_statistics_as_mdistiller(image_tree, workdir):  # noqa: F811
    """--ofd_teacher train: the teacher's running statistics move (mdistiller's OFD puts its whole
    distiller in training mode), its weights do not; eval (the default) leaves the teacher as it
    was. A cohort whose members disagree is refused: they share one teacher."""
    teacher = checkpoint(workdir / 'logs/teacher')['params']
    common = [*TINY, '--width', 0.5, '--epochs', 1, '--seed', 6, '--dataroot', image_tree, '--teacher_id', 'teacher',
              '--ofd_beta', 1e-3]
    for mode in ('eval', 'train'):
        ok(run_cli('cifar.py', *common, '--ofd_teacher', mode, '--save', f'logs/ofd_{mode}', cwd=workdir))
        params = checkpoint(workdir / f'logs/ofd_{mode}')['params']
        moved = {k for k, v in teacher.items() if not torch.equal(params['teacher.' + k], v)}
        stats = {k for k in teacher if 'running' in k}
        assert moved == (stats if mode == 'train' else set()), mode
    eval_run, train_run = (log_lines(workdir / f'logs/ofd_{mode}')[0] for mode in ('eval', 'train'))
    assert eval_run['ofd_loss'] != train_run['ofd_loss'] and train_run['ofd_teacher'] == 'train'
    members = '[{"name": "a", "seed": 1, "ofd_teacher": "train"}, {"name": "b", "seed": 2}]'
    refused = run_cli('cifar.py', *common, '--cohort', members, '--save', 'logs/ofd_mixed', cwd=workdir)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "member 'a' runs the teacher in training mode" in refused.stderr
    assert not (workdir / 'logs/ofd_mixed').exists()

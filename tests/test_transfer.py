"""The objective (objective.py): which terms a set of flags turns on, their weights and extra
parameters, the gradient-based penalties' gradients, and every flag through cifar.py."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cifar
from conftest import ROOT, run_cli, run_in_process
from engine.errors import UserError
from engine.members import join_networks
from engine.objective import Objective
from resnet import resnet
from test_cifar import TINY, checkpoint, expect_user_error, log_lines, ok
from utils import batch_norm

ALL_FLAGS = ['--beta', 0.2, '--alpha', 0.9, '--at_p', 4, '--at_form', 'paper', '--beta_decay', 0.1,
             '--grad_beta', 1, '--sym_beta', 1, '--factt_beta', 1, '--fitnet_beta', 1, '--cos_beta', 1,
             '--aux_weight', 0.5]


def options(*flags):
    """The options cifar.py would parse from these flags."""
    return cifar.parse_args(['--save', 'unused', *map(str, flags)])


def wrn_pair(student_width=0.5, teacher_width=1, teacher_depth=10):
    torch.manual_seed(0)
    f_s, p_s = resnet(10, student_width, 10)
    f_t, p_t = resnet(teacher_depth, teacher_width, 10)
    return f_s, p_s, (lambda x, p, prefix, **asked: f_t(x, p, False, prefix, **asked),
                      {k: v.requires_grad_(False) for k, v in p_t.items()})


# ----------------------------------------------------------------------------------------------
# Terms, weights, parameters

@pytest.mark.parametrize('flags', [[], ['--aux_weight', 1, '--sym_beta', 1]])
def test_student_alone_terms(flags):
    f_s, p_s, _ = wrn_pair()
    transfer, params = join_networks(options(*flags), f_s, p_s)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for mode in (True, False):
        y_s, terms = transfer(x, y, params, mode)
        assert list(terms) == transfer.term_names(training=mode)
        assert y_s.shape == (4, 10) and all(torch.isfinite(v) for v in terms.values())
    assert transfer.term_names(training=False) == ['cross_entropy']


def test_every_flag_adds_its_terms_with_a_teacher():
    opt = options('--teacher_id', 't', *ALL_FLAGS)
    transfer, params = join_networks(opt, *wrn_pair())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, terms = transfer(x, y, params, True)
    assert list(terms) == transfer.term_names() == [
        'distillation', 'at0', 'at1', 'at2', 'factt0', 'factt1', 'factt2', 'fitnet', 'cos',
        'grad_at', 'symmetry', 'aux0', 'aux1']
    _, eval_terms = transfer(x, y, params, False)  # no input gradients or auxiliary heads at test time
    assert list(eval_terms) == transfer.term_names(training=False) == list(terms)[:9]
    # Only the student and its aux parameters are trained by the sum; the teacher is untouched.
    assert_sum_trains_student_not_teacher(transfer, terms, params)


def assert_sum_trains_student_not_teacher(transfer, terms, params):
    """The epoch-1 weighted sum of `terms` reaches every trainable tensor but the teacher's."""
    weights = transfer.weights(1, [])
    sum(weights[n.rstrip('0123456789')] * v for n, v in terms.items()).backward()
    assert all(v.grad is None for k, v in params.items() if k.startswith('teacher.'))
    for k, v in params.items():
        if v.requires_grad:
            assert v.grad is not None and v.grad.abs().sum() > 0, k


def test_weights_follow_flags_and_beta_decays_at_each_step():
    opt = options('--teacher_id', 't', '--beta', 1e3, '--beta_decay', 0.1, '--epoch_step', '[3,5]',
                  '--grad_beta', 4, '--aux_weight', 0.3)
    transfer, _ = join_networks(opt, *wrn_pair())
    betas = [transfer.weights(e, [3, 5])['at'] for e in range(1, 7)]
    assert betas == pytest.approx([1e3, 1e3, 100, 100, 10, 10])
    w = transfer.weights(1, [3, 5])
    assert w == {'distillation': 1, 'at': 1e3, 'grad_at': 2, 'aux': 0.3}
    paper, _ = join_networks(options('--teacher_id', 't', '--beta', 0.2, '--at_form', 'paper'), *wrn_pair())
    assert paper.weights(1, [])['at'] == pytest.approx(0.1)  # the paper's beta/2


def test_aux_params_have_the_networks_shapes_and_are_not_the_students():
    # F-ActT maps widths only where they differ: WRN-10-0.5 (8/16/32) to WRN-10-1 (16/32/64)...
    opt = options('--teacher_id', 't', '--factt_beta', 1, '--fitnet_beta', 1, '--aux_weight', 1)
    _, params = join_networks(opt, *wrn_pair())
    aux = {k: tuple(v.shape) for k, v in params.items() if k.startswith('aux.')}
    assert aux['aux.factt0.conv'] == (16, 8, 1, 1) and aux['aux.factt2.conv'] == (64, 32, 1, 1)
    assert aux['aux.fitnet.conv'] == (32, 16, 3, 3)
    assert aux['aux.head0.fc.weight'] == (10, 8) and aux['aux.head1.fc.weight'] == (10, 16)
    assert not params['aux.head0.bn.running_mean'].requires_grad
    assert params['aux.head0.bn.weight'].requires_grad
    # ...and not between equal widths (WRN-10-1 from WRN-16-1).
    _, params = join_networks(opt, *wrn_pair(1, 1, 16))
    assert not any(k.startswith('aux.factt') for k in params)


def test_options_that_cannot_train_are_refused():
    for flags, phrase in [(['--grad_beta', 1], '--grad_beta compares the student with a teacher'),
                          (['--factt_beta', 1], 'give --teacher_id'),
                          (['--sym_beta', 1, '--compile', 'on'], 'torch.compile'),
                          (['--cos_beta', -1, '--teacher_id', 't'], '--cos_beta -1.0 is negative'),
                          (['--at_p', 0], '--at_p'), (['--beta_decay', 0], '--beta_decay')]:
        with pytest.raises(UserError, match=phrase):
            options(*flags)
    options('--sym_beta', 1)  # needs no teacher


def test_groups_of_other_sizes_are_refused():
    f_s, p_s, _ = wrn_pair()
    f_t, p_t = resnet(10, 1, 10)

    def half_size_groups(x, p, prefix):
        y, groups = f_t(x, p, False, prefix)
        return y, [F.avg_pool2d(g, 2) for g in groups]

    shrink = (half_size_groups, p_t)
    with pytest.raises(UserError, match='same spatial sizes'):
        join_networks(options('--teacher_id', 't', '--factt_beta', 1), f_s, p_s, shrink)


# ----------------------------------------------------------------------------------------------
# Gradient-based AT: the penalty trains the student through double backprop

def tiny_networks():
    """A conv-tanh-pool-linear student and teacher: smooth, so second derivatives are not zero."""
    def net(x, params, prefix):
        h = torch.tanh(F.conv2d(x, params[prefix + 'conv'], padding=1))
        return F.linear(h.mean((2, 3)), params[prefix + 'fc']), [h]

    torch.manual_seed(0)
    params = {'student.conv': torch.randn(4, 3, 3, 3, dtype=torch.float64),
              'student.fc': torch.randn(5, 4, dtype=torch.float64),
              'teacher.conv': torch.randn(4, 3, 3, 3, dtype=torch.float64),
              'teacher.fc': torch.randn(5, 4, dtype=torch.float64)}
    return (lambda x, p, mode, prefix: net(x, p, prefix)), (lambda x, p, prefix: net(x, p, prefix)), params


@pytest.mark.parametrize('term, flags', [('grad_at', ['--grad_beta', 1]), ('symmetry', ['--sym_beta', 1])])
def test_input_gradient_penalty_gradient_is_correct_and_nonzero(term, flags):
    f_s, f_t, params = tiny_networks()
    transfer = Objective(options('--teacher_id', 't', *flags), f_s, f_t)
    transfer.add_parts(params, 6)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 3])

    def penalty(conv, fc):
        return transfer(x, y, {**params, 'student.conv': conv, 'student.fc': fc}, True)[1][term]

    conv = params['student.conv'].clone().requires_grad_()
    fc = params['student.fc'].clone().requires_grad_()
    assert torch.autograd.gradcheck(penalty, (conv, fc))
    g_conv, g_fc = torch.autograd.grad(penalty(conv, fc), (conv, fc))
    assert g_conv.abs().max() > 1e-6 and g_fc.abs().max() > 1e-6


def test_gradient_penalty_is_zero_when_student_equals_teacher():
    f_s, f_t, params = tiny_networks()
    params['student.conv'], params['student.fc'] = params['teacher.conv'], params['teacher.fc']
    transfer = Objective(options('--teacher_id', 't', '--grad_beta', 1), f_s, f_t)
    transfer.add_parts(params, 6)
    _, terms = transfer(torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 4]), params, True)
    assert terms['grad_at'].item() < 1e-12 and terms['distillation'].item() > 0


# ----------------------------------------------------------------------------------------------
# Through the command line

@pytest.fixture(scope='module')
def workdir(image_tree, tmp_path_factory):
    """A directory with a trained teacher in logs/teacher (WRN-10-1, one epoch)."""
    d = tmp_path_factory.mktemp('transfer')
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--seed', 1, '--dataroot', image_tree,
               '--save', 'logs/teacher', cwd=d))
    return d


def test_all_flags_together_through_the_cli(image_tree, workdir):
    ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', 2, '--epoch_step', '[2]', '--seed', 2,
               '--dataroot', image_tree, '--teacher_id', 'teacher', *ALL_FLAGS, '--save', 'logs/all',
               cwd=workdir))
    log = log_lines(workdir / 'logs/all')
    for r in log:
        for key, n in [('at_losses', 3), ('factt_losses', 3), ('aux_losses', 2)]:
            assert len(r[key]) == n, key
        meters = r['at_losses'] + r['factt_losses'] + r['aux_losses'] + \
            [r[k] for k in ('distillation_loss', 'grad_at_loss', 'symmetry_loss', 'fitnet_loss', 'cos_loss')]
        for mean, std in meters:
            assert math.isfinite(mean) and mean > 0 and std > 0
        assert math.isfinite(r['test_loss']) and r['at_p'] == 4 and r['at_form'] == 'paper'
    assert log[0]['loss_weights'] == {'distillation': 1, 'at': 0.1, 'grad_at': 0.5, 'symmetry': 0.5,
                                      'factt': 1, 'fitnet': 1, 'cos': 1, 'aux': 0.5}
    assert log[1]['loss_weights']['at'] == pytest.approx(0.01)
    ckpt = checkpoint(workdir / 'logs/all')
    assert {'aux.fitnet.conv', 'aux.factt0.conv', 'aux.head1.fc.weight'} <= set(ckpt['params'])
    assert log[0]['n_parameters'] == sum(v.numel() for v in resnet(10, 0.5, 10)[1].values())


def test_student_alone_with_aux_heads_and_symmetry_then_teaches(image_tree, workdir):
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--seed', 3, '--dataroot', image_tree,
               '--aux_weight', 0.3, '--sym_beta', 1, '--save', 'logs/aux', cwd=workdir))
    r = log_lines(workdir / 'logs/aux')[0]
    assert r['at_losses'] == [] and len(r['aux_losses']) == 2
    assert r['cross_entropy_loss'][0] > 0 and r['symmetry_loss'][0] > 0
    assert any(k.startswith('aux.head0') for k in checkpoint(workdir / 'logs/aux')['params'])
    # Its checkpoint holds the heads; as a teacher only the network is read.
    ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', 1, '--seed', 3, '--dataroot', image_tree,
               '--teacher_id', 'aux', '--beta', 1e3, '--at_p', 1, '--save', 'logs/from_aux', cwd=workdir))
    params = checkpoint(workdir / 'logs/from_aux')['params']
    assert not any(k.startswith(('aux.', 'teacher.aux.')) for k in params)


def test_resume_continues_the_beta_schedule_and_aux_parameters(image_tree, workdir):
    def run(epochs, *extra):
        return ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', epochs, '--epoch_step', '[2,3]',
                          '--seed', 4, '--dataroot', image_tree, '--teacher_id', 'teacher', '--beta', 1e3,
                          '--alpha', 0.9, '--beta_decay', 0.5, '--factt_beta', 0.1, '--deterministic',
                          '--precision', 'fp32', *extra,
                          cwd=workdir))

    run(3, '--save', 'logs/straight')
    run(1, '--save', 'logs/split')
    run(3, '--save', 'logs/split', '--resume', 'logs/split/model.pt7')
    straight, split = log_lines(workdir / 'logs/straight'), log_lines(workdir / 'logs/split')
    assert [r['loss_weights']['at'] for r in split] == [1000, 500, 250]
    assert [r['loss_weights'] for r in split] == [r['loss_weights'] for r in straight]
    a, b = checkpoint(workdir / 'logs/straight')['params'], checkpoint(workdir / 'logs/split')['params']
    assert any(k.startswith('aux.factt') for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_transfer_flags_without_teacher_are_one_line_errors(image_tree, workdir):
    before = sorted(os.listdir(workdir / 'logs'))
    expect_user_error(run_cli('cifar.py', *TINY, '--epochs', 1, '--dataroot', image_tree, '--fitnet_beta', 1,
                              '--save', 'logs/x', cwd=workdir), '--fitnet_beta', '--teacher_id')
    assert sorted(os.listdir(workdir / 'logs')) == before


# ----------------------------------------------------------------------------------------------
# The CRD benchmark's other methods and DKD

# RepDistiller's weights (DKD and KDSVD: mdistiller's), as scripts/crd_table.sh gives them
METHOD_FLAGS = ['--sp_beta', 3000, '--cc_beta', 0.02, '--rkd_beta', 1, '--pkt_beta', 3e4, '--nst_beta', 50,
                '--kdsvd_beta', 1, '--fsp_beta', 1, '--vid_beta', 1, '--dkd_beta', 1]


def double_pair(student_width=1, teacher_depth=16):
    """WRN-10-<student_width> and a WRN-<teacher_depth>-1 teacher in float64, the teacher
    wrapped as cifar.py wraps it (handing out its pooled feature when asked, naming its BNs
    before ReLUs for OFD)."""
    torch.manual_seed(0)
    f_s, p_s = resnet(10, student_width, 10)
    f_t, p_t = resnet(teacher_depth, 1, 10)

    def teacher(x, p, prefix, **pooled):
        return f_t(x, p, False, prefix, **pooled)
    teacher.bn_before_relu = f_t.bn_before_relu
    return f_s, as_double(p_s), (teacher, as_double(p_t, requires_grad=False))


def as_double(params, requires_grad=None):
    return {k: v.detach().double().requires_grad_(v.requires_grad if requires_grad is None else requires_grad)
            for k, v in params.items()}


def test_each_method_term_is_its_loss_of_the_networks_outputs():
    """Every new term, beside AT and standardised KD, is its method's loss of the outputs
    RepDistiller hands it: the last groups (SP), pooled features (CC through its embeddings,
    RKD, PKT), each group pair (NST, VID through its regressor), all groups (KDSVD; FSP with the
    stem's output before them), logits."""
    from methods import at, cc, dkd, fsp, kd, kdsvd, nst, pkt, rkd, sp, vid
    opt = options('--teacher_id', 't', '--alpha', 0.9, '--beta', 1e3, '--temperature', 2, '--logit_stand',
                  '--rkd_w_d', 5, '--rkd_w_a', 7, '--kdsvd_k', 2, '--dkd_alpha', 0.5, '--dkd_nckd', 3,
                  *METHOD_FLAGS)
    f_s, p_s, teacher = double_pair()
    transfer, params = join_networks(opt, f_s, p_s, teacher)
    params = as_double(params)  # the learned parts, made in float32, as a --dtype double run casts them
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    with torch.no_grad():
        _, terms = transfer(x, y, params, False)
        z_s, g_s, e_s, _, stem_s = f_s(x, params, False, 'student.', stem=True)
        z_t, g_t, e_t, _, stem_t = teacher[0](x, params, 'teacher.', stem=True)

    def embed(e, side):
        return F.linear(e, params[f'aux.cc.embed_{side}.weight'], params[f'aux.cc.embed_{side}.bias'])

    def regress(s, g):
        for i in range(3):
            s = F.conv2d(s, params[f'aux.vid{g}.conv{i}'])
            s = F.relu(s) if i < 2 else s
        return s

    expected = {
        'distillation': kd.distillation(z_s, z_t, y, 2, 0.9, standardize=True),
        **{f'at{g}': at.at_loss(s, t) for g, (s, t) in enumerate(zip(g_s, g_t))},
        'sp': sp.sp_loss(g_s[-1], g_t[-1]), 'cc': cc.cc_loss(embed(e_s, 's'), embed(e_t, 't')),
        'rkd': rkd.rkd_loss(e_s, e_t, 5, 7), 'pkt': pkt.pkt_loss(e_s, e_t),
        **{f'nst{g}': nst.nst_loss(s, t) for g, (s, t) in enumerate(zip(g_s, g_t))},
        'kdsvd': kdsvd.kdsvd_loss(g_s, g_t, 2), 'fsp': fsp.fsp_loss([stem_s, *g_s], [stem_t, *g_t]),
        **{f'vid{g}': vid.vid_loss(regress(s, g), t, params[f'aux.vid{g}.log_scale'])
           for g, (s, t) in enumerate(zip(g_s, g_t))},
        'dkd': dkd.dkd_loss(z_s, z_t, y, 0.5, 3, 2, standardize=True)}
    assert list(terms) == transfer.term_names(training=False) == list(expected)
    for name, value in expected.items():
        assert value.abs() > 0, name
        torch.testing.assert_close(terms[name], value, rtol=1e-12, atol=0, msg=name)
    assert transfer.weights(1, []) == {'distillation': 1, 'at': 1e3, 'sp': 3000, 'cc': 0.02, 'rkd': 1,
                                       'pkt': 3e4, 'nst': 50, 'kdsvd': 1, 'fsp': 1, 'vid': 1, 'dkd': 1 / 20}
    # training: the weighted sum reaches the student and every learned part, never the teacher
    _, terms = transfer(x, y, params, True)
    assert_sum_trains_student_not_teacher(transfer, terms, params)


def test_learned_parts_of_cc_and_vid_follow_repdistiller():
    # WRN-10-0.5 (8/16/32 channels, pooled 32) from WRN-10-1 (16/32/64, pooled 64)
    opt = options('--teacher_id', 't', '--cc_beta', 1, '--cc_dim', 24, '--vid_beta', 1)
    _, params = join_networks(opt, *double_pair(0.5, 10))
    aux = {k: tuple(v.shape) for k, v in params.items() if k.startswith('aux.')}
    assert aux == {'aux.cc.embed_s.weight': (24, 32), 'aux.cc.embed_s.bias': (24,),
                   'aux.cc.embed_t.weight': (24, 64), 'aux.cc.embed_t.bias': (24,),
                   **{k: v for g, (c_s, c_t) in enumerate([(8, 16), (16, 32), (32, 64)]) for k, v in {
                       f'aux.vid{g}.conv0': (c_t, c_s, 1, 1), f'aux.vid{g}.conv1': (c_t, c_t, 1, 1),
                       f'aux.vid{g}.conv2': (c_t, c_t, 1, 1), f'aux.vid{g}.log_scale': (c_t,)}.items()}}
    assert all(params[k].requires_grad for k in aux)
    for g in range(3):  # VIDLoss's initial variance: softplus(log_scale) + eps = 5
        variance = F.softplus(params[f'aux.vid{g}.log_scale']) + 1e-5
        torch.testing.assert_close(variance, torch.full_like(variance, 5.0))


@pytest.mark.parametrize('flag, name', [('--fsp_beta', 'FSP'), ('--kdsvd_beta', 'KDSVD')])
def test_fsp_and_kdsvd_refuse_groups_of_other_widths(flag, name):
    with pytest.raises(UserError, match=f"{flag}: {name} compares the groups' channels one to one, and group 0 "
                                        f"has 8 in the student and 16 in the teacher"):
        join_networks(options('--teacher_id', 't', flag, 1), *double_pair(0.5, 10))
    join_networks(options('--teacher_id', 't', flag, 1), *double_pair(1, 10))  # equal widths


def test_networks_hand_out_the_pooled_feature_only_to_methods_that_read_it():
    f_s, p_s, (f_t, p_t) = double_pair()
    asked = []

    def spy(f, who):
        def g(*args, **kw):
            asked.append((who, kw.get('pooled', False)))
            return f(*args, **kw)
        return g

    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2])
    for flags, pooled in [(['--beta', 1, '--sp_beta', 1, '--nst_beta', 1, '--dkd_beta', 1], False),
                          (['--cc_beta', 1], True), (['--rkd_beta', 1], True), (['--pkt_beta', 1], True)]:
        transfer, params = join_networks(options('--teacher_id', 't', *flags), spy(f_s, 's'), p_s,
                                         (spy(f_t, 't'), p_t))
        params = as_double(params)
        asked.clear()
        transfer(x, y, params, True)
        assert asked == [('s', pooled), ('t', pooled)], flags
        assert transfer.teacher_outputs(x, y, params, pooled=True).pooled.shape == (2, 64)  # a cohort's other member


def test_networks_hand_out_pre_relu_groups_only_to_methods_that_read_them(monkeypatch):
    """--ab_beta and --ofd_beta ask both networks for preact=True; the pre-ReLU groups reach the
    methods in the batch's outputs, and a cohort's teacher forward can ask for them alone."""
    from engine import objective
    f_s, p_s, (f_t, p_t) = double_pair()
    asked, handed = [], []

    class Batch(objective.Batch):  # what the methods' terms are handed
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            handed.append(self)
    monkeypatch.setattr(objective, 'Batch', Batch)

    def spy(f, who):
        def g(*args, **kw):
            asked.append((who, kw.get('preact', False)))
            return f(*args, **kw)
        g.bn_before_relu = getattr(f, 'bn_before_relu', None)  # OFD's margins
        return g

    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 2])
    for flags, preact in [(['--beta', 1, '--cc_beta', 1], False), (['--ab_beta', 1], True), (['--ofd_beta', 1], True)]:
        transfer, params = join_networks(options('--teacher_id', 't', *flags), spy(f_s, 's'), p_s,
                                         (spy(f_t, 't'), p_t))
        params = as_double(params)
        asked.clear(), handed.clear()
        transfer(x, y, params, True)
        assert transfer.preact == preact and asked == [('s', preact), ('t', preact)], flags
        p_s_, p_t_ = handed[0].s.preact, handed[0].t.preact
        if preact:
            assert [p.shape[1] for p in p_s_] == [16, 32, 64] and [p.shape[1] for p in p_t_] == [16, 32, 64]
            with torch.no_grad():
                _, g_t, _ = f_t(x, params, 'teacher.', pooled=True)
            torch.testing.assert_close(p_t_[2], batch_norm(g_t[2], params, 'teacher.bn', False))
        else:
            assert p_s_ is None and p_t_ is None
        outputs = transfer.teacher_outputs(x, y, params, preact=True)
        assert outputs.pooled.shape == (2, 64) and len(outputs.preact) == 3


def test_dkd_warms_up_with_the_epoch():
    transfer, _ = join_networks(options('--teacher_id', 't', '--dkd_beta', 2, '--dkd_warmup', 4), *double_pair())
    assert [transfer.weights(e, [])['dkd'] for e in range(1, 7)] == [0.5, 1, 1.5, 2, 2, 2]
    transfer, _ = join_networks(options('--teacher_id', 't', '--dkd_beta', 2, '--dkd_warmup', 0), *double_pair())
    assert transfer.weights(1, [])['dkd'] == 2


def test_method_settings_that_cannot_train_are_refused():
    for flags, phrase in [(['--sp_beta', 1], '--sp_beta compares the student with a teacher; give --teacher_id'),
                          (['--dkd_beta', 1], '--dkd_beta compares the student with a teacher'),
                          (['--vid_beta', -1, '--teacher_id', 't'], '--vid_beta -1.0 is negative'),
                          (['--kdsvd_k', 0], '--kdsvd_k 0 is below 1'), (['--cc_dim', 0], '--cc_dim 0 is below 1'),
                          (['--rkd_w_a', -1], '--rkd_w_a -1.0 is negative'),
                          (['--dkd_nckd', -8], '--dkd_nckd -8.0 is negative'),
                          (['--dkd_warmup', -1], '--dkd_warmup -1 is negative')]:
        with pytest.raises(UserError, match=phrase):
            options(*flags)


def test_runs_share_a_compiled_forward_only_with_the_same_settings():
    from engine.training import forward_options
    base = forward_options(options('--teacher_id', 't', '--rkd_beta', 1, '--dkd_beta', 1))
    assert forward_options(options('--teacher_id', 't', '--rkd_beta', 2, '--dkd_beta', 3, '--dkd_warmup', 5)) == base
    for flags in (['--rkd_w_d', 1], ['--rkd_w_a', 1], ['--kdsvd_k', 2], ['--cc_dim', 64], ['--dkd_alpha', 2],
                  ['--dkd_nckd', 2], ['--logit_stand'], ['--pkt_beta', 1]):
        assert forward_options(options('--teacher_id', 't', '--rkd_beta', 1, '--dkd_beta', 1, *flags)) != base, flags


def test_fsp_with_other_widths_is_a_one_line_error_that_writes_nothing(image_tree, workdir):
    before = sorted(os.listdir(workdir / 'logs'))
    expect_user_error(run_in_process(cifar.main, *TINY, '--width', 0.5, '--epochs', 1, '--dataroot', image_tree,
                                     '--teacher_id', 'teacher', '--fsp_beta', 1, '--save', 'logs/fsp', cwd=workdir),
                      "--fsp_beta: FSP compares the groups' channels one to one, and group 0 has 8 in the student "
                      "and 16 in the teacher")
    assert sorted(os.listdir(workdir / 'logs')) == before


@pytest.mark.parametrize('teacher_width', [1, 2])
def test_fitnet_convreg_is_repdistillers_hint_regressor(teacher_width):
    """--fitnet_regressor convreg: the middle group through RepDistiller's ConvReg (conv with
    bias, BN, ReLU; a 1x1 conv at equal sizes) against the teacher's, mean squared error; here
    from a WRN-10-0.5 student to a WRN-10-1/2 teacher (16 -> 32/64 channels, 16x16)."""
    f_s, p_s, teacher = wrn_pair(teacher_width=teacher_width)
    opt = options('--teacher_id', 'x', '--fitnet_beta', 100, '--fitnet_regressor', 'convreg')
    transfer, params = join_networks(opt, f_s, p_s, teacher)
    params = {k: v.double() for k, v in params.items()}
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    _, terms = transfer(x, y, params, True)
    g_s = f_s(x, {k[len('student.'):]: v for k, v in params.items() if k.startswith('student.')}, True)[1][1]
    g_t = teacher[0](x, {k[len('teacher.'):]: v for k, v in params.items() if k.startswith('teacher.')}, '')[1][1]
    conv = torch.nn.Conv2d(g_s.shape[1], g_t.shape[1], 1).double()
    bn = torch.nn.BatchNorm2d(g_t.shape[1]).double()
    with torch.no_grad():
        conv.weight.copy_(params['aux.fitnet.conv.weight'])
        conv.bias.copy_(params['aux.fitnet.conv.bias'])
        bn.weight.copy_(params['aux.fitnet.bn.weight'])
        bn.bias.copy_(params['aux.fitnet.bn.bias'])
    reference = torch.nn.functional.mse_loss(torch.relu(bn(conv(g_s))), g_t)
    assert torch.allclose(terms['fitnet'], reference, rtol=1e-12, atol=0)
    assert params['aux.fitnet.conv.weight'].requires_grad and not params['aux.fitnet.bn.running_mean'].requires_grad


def test_kd_with_standardised_logits_as_its_authors_weigh_it():
    """Their configuration: 0.1 * CE + 9 * KD(standardised logits, T 2), the KD's KL summed over
    classes and averaged over the batch times T^2 (their kd_loss), the CE on the raw logits."""
    from methods import kd
    opt = options('--teacher_id', 't', '--kd_beta', 9, '--ce_weight', 0.1, '--temperature', 2, '--logit_stand')
    f_s, p_s, teacher = double_pair()
    transfer, params = join_networks(opt, f_s, p_s, teacher)
    x, y = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    params = as_double(params)
    with torch.no_grad():
        _, terms = transfer(x, y, params, True)
        z_s, _ = f_s(x, params, True, 'student.')
        z_t, _ = teacher[0](x, params, 'teacher.')
    weights = transfer.weights(1, [])
    assert {k: v for k, v in weights.items() if v} == {'distillation': 0.1, 'kd': 9}
    from engine.objective import kind
    total = sum(weights[kind(name)] * value for name, value in terms.items())  # AT's terms are logged at weight 0

    def standardized(z):
        return (z - z.mean(1, keepdim=True)) / (1e-7 + z.std(1, keepdim=True))
    kl = F.kl_div(F.log_softmax(standardized(z_s) / 2, 1), F.softmax(standardized(z_t) / 2, 1), reduction='none')
    expected = 0.1 * F.cross_entropy(z_s, y) + 9 * kl.sum(1).mean() * 4
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    assert kd.KD_LS == {'kd_beta': 9, 'ce_weight': 0.1, 'temperature': 2, 'logit_stand': True}
    with pytest.raises(UserError, match=r'--ce_weight 0.1 weighs the cross-entropy where --alpha is 0; --alpha 0.9'):
        options('--teacher_id', 't', '--alpha', 0.9, '--ce_weight', 0.1)
    with pytest.raises(UserError, match='--ce_weight -1.0 is negative'):
        options('--ce_weight', -1)


def test_term_gradients_sets_each_weighted_term_against_the_classification_term(image_tree, workdir, monkeypatch,
                                                                                capsys):
    """benchmarks/term_gradients.py: per member and step, ||grad (w * term)|| / ||grad classification||
    over the student's weights; the weights are the run's, AT's unweighted terms are left out."""
    import importlib.util
    path = os.path.join(ROOT, 'benchmarks', 'term_gradients.py')
    spec = importlib.util.spec_from_file_location('term_gradients', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.chdir(workdir)
    weighted_sum = tool.members_module.Member.weighted_sum
    try:
        tool.main(['--', *map(str, [*TINY, '--width', 0.5, '--epochs', 1, '--dataroot', image_tree, '--teacher_id',
                                    'teacher', '--save', 'logs/term_gradients']),
                   '--cohort', '[{"name": "sp", "seed": 1, "sp_beta": 3000}, {"name": "kd", "seed": 1, "alpha": 0.9}]'])
    finally:
        tool.members_module.Member.weighted_sum = weighted_sum
    rows = [line.split(' | ') for line in capsys.readouterr().out.splitlines() if line.startswith('| sp |')]
    assert len(rows) == 1 and rows[0][1:3] == ['sp', '3000']
    mean, first, last = (float(v.strip(' |')) for v in rows[0][3:])
    assert mean > 0 and first > 0 and last > 0

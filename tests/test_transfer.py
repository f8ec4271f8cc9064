"""The objective of transfer.py: which terms a set of flags turns on, their weights and extra
parameters, the gradient-based penalties' gradients, and every flag through cifar.py."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cifar
from conftest import run_cli
from errors import UserError
from resnet import resnet
from test_cifar import TINY, checkpoint, expect_user_error, log_lines, ok
from training import join_networks
from transfer import Transfer

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
    return f_s, p_s, (lambda x, p, prefix: f_t(x, p, False, prefix),
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
    transfer = Transfer(options('--teacher_id', 't', *flags), f_s, f_t)
    transfer.add_aux_params(params, 6)
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
    transfer = Transfer(options('--teacher_id', 't', '--grad_beta', 1), f_s, f_t)
    transfer.add_aux_params(params, 6)
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
                          '--alpha', 0.9, '--beta_decay', 0.5, '--factt_beta', 0.1, '--deterministic', *extra,
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

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from resnet import IMAGENET_BLOCKS, define_student, fold_batch_norm, resnet, teacher_forward, wrn_block_count


@pytest.mark.parametrize('depth,width,count', [(16, 1, 175994), (16, 2, 693498),
                                               (40, 1, 566650), (40, 2, 2248954)])
def test_parameter_counts_match_the_paper_models(depth, width, count):
    _, params = resnet(depth, width, 10)
    assert sum(p.numel() for p in params.values()) == count


def test_depth_must_be_6n_plus_4():
    assert wrn_block_count(16) == 2 and wrn_block_count(40) == 6
    assert wrn_block_count(15) is None and wrn_block_count(4) is None
    with pytest.raises(AssertionError):
        resnet(18, 1, 10)


def test_keys_and_initialisation_follow_the_reference_code():
    torch.manual_seed(0)
    _, p = resnet(16, 2, 100)
    assert list(p)[:8] == ['conv0', 'group0.block0.conv0', 'group0.block0.conv1',
                           'group0.block0.bn0.weight', 'group0.block0.bn0.bias',
                           'group0.block0.bn0.running_mean', 'group0.block0.bn0.running_var',
                           'group0.block0.bn1.weight']
    assert p['group0.block0.convdim'].shape == (32, 16, 1, 1)
    assert 'group0.block1.convdim' not in p
    assert p['fc.weight'].shape == (100, 128)
    w = p['group2.block0.conv1']                       # Kaiming normal: std sqrt(2 / fan_in)
    assert abs(w.std().item() - (2 / (128 * 9)) ** 0.5) < 0.01
    bn = p['group1.block0.bn1.weight']
    assert 0 <= bn.min() and bn.max() < 1 and bn.std() > 0.1
    assert not p['bn.running_var'].requires_grad and p['bn.weight'].requires_grad
    assert (p['fc.bias'] == 0).all() and (p['bn.running_var'] == 1).all()


class Block(nn.Module):
    """Pre-activation basic block written with nn modules, independently of resnet.py."""

    def __init__(self, ni, no, stride):
        super().__init__()
        self.bn0, self.bn1 = nn.BatchNorm2d(ni), nn.BatchNorm2d(no)
        self.conv0 = nn.Conv2d(ni, no, 3, stride, 1, bias=False)
        self.conv1 = nn.Conv2d(no, no, 3, 1, 1, bias=False)
        self.convdim = nn.Conv2d(ni, no, 1, stride, bias=False) if ni != no else None

    def forward(self, x):
        o1 = F.relu(self.bn0(x))
        z = self.conv1(F.relu(self.bn1(self.conv0(o1))))
        return z + (self.convdim(o1) if self.convdim is not None else x)


class WRN(nn.Module):
    def __init__(self, depth, width, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        w = [16, int(16 * width), int(32 * width), int(64 * width)]
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.groups = nn.ModuleList(
            nn.Sequential(*[Block(w[g] if i == 0 else w[g + 1], w[g + 1], (1 if g == 0 else 2) if i == 0 else 1)
                            for i in range(n)]) for g in range(3))
        self.bn = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        gs, o = [], self.conv0(x)
        for g in self.groups:
            o = g(o)
            gs.append(o)
        o = F.adaptive_avg_pool2d(F.relu(self.bn(o)), 1).flatten(1)
        return self.fc(o), gs

    def load_flat(self, params):
        sd = {}
        for k, v in params.items():
            k = k.replace('group', 'groups.').replace('.block', '.')
            if v.dim() == 4:  # convolutions are bare tensors in the flat dict
                k += '.weight'
            sd[k] = v.detach().clone()
        missing, unexpected = self.load_state_dict(sd, strict=False)
        assert unexpected == [] and all(m.endswith('num_batches_tracked') for m in missing)


@pytest.mark.parametrize('mode', [False, True])
def test_forward_matches_an_nn_module_reference(mode):
    torch.manual_seed(1)
    f, params = resnet(16, 1.5, 10)
    for k, v in params.items():  # non-trivial statistics so eval mode is a real test
        if k.endswith('running_mean'):
            v.normal_()
        elif k.endswith('running_var'):
            v.uniform_(0.5, 2)
    ref = WRN(16, 1.5, 10).double()
    ref.load_flat(params)
    ref.train(mode)
    params = {k: v.double() for k, v in params.items()}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y, groups = f(x, params, mode)
    y_ref, groups_ref = ref(x)
    assert y.shape == (4, 10)
    assert [g.shape[1:] for g in groups] == [(24, 32, 32), (48, 16, 16), (96, 8, 8)]
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(groups, groups_ref):
        torch.testing.assert_close(g, r)
    if mode:  # training mode moves the running statistics like nn.BatchNorm2d does
        torch.testing.assert_close(params['group1.block0.bn1.running_mean'], ref.groups[1][0].bn1.running_mean)


def test_prefix_selects_one_network_of_a_shared_dict():
    torch.manual_seed(2)
    f, p = resnet(10, 1, 10)
    shared = {'student.' + k: v for k, v in p.items()}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(f(x, shared, False, 'student.')[0], f(x, p, False)[0])


def test_pooled_feature_is_the_classifier_input_of_the_reference():
    torch.manual_seed(3)
    f, params = resnet(16, 1, 10)
    ref = WRN(16, 1, 10).double().eval()
    ref.load_flat(params)
    params = {k: v.double() for k, v in params.items()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    captured = []
    ref.fc.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        y, groups = f(x, params, False)
        y_pooled, groups_pooled, feature = f(x, params, False, pooled=True)
        ref(x)
    assert feature.shape == (2, 64)
    torch.testing.assert_close(feature, captured[0])
    torch.testing.assert_close(y_pooled, F.linear(feature, params['fc.weight'], params['fc.bias']))
    assert torch.equal(y, y_pooled) and all(torch.equal(a, b) for a, b in zip(groups, groups_pooled))


def test_imagenet_student_and_folded_teacher_hand_out_the_pooled_feature():
    torch.manual_seed(4)
    student, params = define_student(18, 0.125, 10)
    for k, v in params.items():  # statistics away from 0 and 1, so folding them changes something
        if k.endswith('running_var'):
            v.uniform_(0.5, 2)
    teacher, folded = teacher_forward(IMAGENET_BLOCKS[18]), fold_batch_norm(params)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for f, p, args in ((student, params, (False,)), (teacher, folded, ())):
            y, groups = f(x, p, *args)
            y_pooled, groups_pooled, feature = f(x, p, *args, pooled=True)
            assert feature.shape == (2, 64)
            torch.testing.assert_close(y_pooled, F.linear(feature, p['fc.weight'], p['fc.bias']))
            assert torch.equal(y, y_pooled) and all(torch.equal(a, b) for a, b in zip(groups, groups_pooled))
        torch.testing.assert_close(teacher(x, folded, pooled=True)[2], student(x, params, False, pooled=True)[2],
                                   rtol=1e-4, atol=1e-4)


def test_imagenet_student_and_folded_teacher_hand_out_their_stem_for_fsp():
    """The stem's output: after the first conv, BN and ReLU, before the max-pool; no pre-ReLU groups."""
    torch.manual_seed(4)
    student, params = define_student(18, 0.125, 10)
    for k, v in params.items():
        if k.endswith('running_var'):
            v.uniform_(0.5, 2)
    teacher, folded = teacher_forward(IMAGENET_BLOCKS[18]), fold_batch_norm(params)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stems = []
        for f, p, args in ((student, params, (False,)), (teacher, folded, ())):
            y, groups, feature = f(x, p, *args, pooled=True)
            y_stem, groups_stem, feature_stem, preact, stem = f(x, p, *args, stem=True)
            assert preact is None and stem.shape == (2, 8, 16, 16) and (stem >= 0).all() and (stem > 0).any()
            assert torch.equal(y, y_stem) and torch.equal(feature, feature_stem)
            assert all(torch.equal(a, b) for a, b in zip(groups, groups_stem))
            stems.append(stem)
        expected = F.relu(F.batch_norm(F.conv2d(x, params['conv0'], stride=2, padding=3), params['bn0.running_mean'],
                                       params['bn0.running_var'], params['bn0.weight'], params['bn0.bias']))
        torch.testing.assert_close(stems[0], expected)
        torch.testing.assert_close(stems[1], expected, rtol=1e-4, atol=1e-4)


def test_preact_groups_are_the_bns_that_follow_each_group():
    """RepDistiller's WRN with preact=True: block2.layer[0].bn1(f1), block3.layer[0].bn1(f2),
    bn1(f3), here group1.block0.bn0(g0), group2.block0.bn0(g1) and bn(g2), the BNs that
    f.bn_before_relu names; read from inside the forward, so training mode updates each BN's
    statistics once, as without preact."""
    torch.manual_seed(5)
    f, params = resnet(16, 1, 10)
    for k, v in params.items():
        if k.endswith('running_mean'):
            v.normal_()
        elif k.endswith('running_var'):
            v.uniform_(0.5, 2)
    ref = WRN(16, 1, 10).double().eval()
    ref.load_flat(params)
    params = {k: v.double() for k, v in params.items()}
    assert f.bn_before_relu == ('group1.block0.bn0', 'group2.block0.bn0', 'bn')
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y, groups = f(x, params, False)
        y_p, groups_p, feature, preact = f(x, params, False, preact=True)
        _, groups_ref = ref(x)
        expected = [ref.groups[1][0].bn0(groups_ref[0]), ref.groups[2][0].bn0(groups_ref[1]), ref.bn(groups_ref[2])]
    assert torch.equal(y, y_p) and all(torch.equal(a, b) for a, b in zip(groups, groups_p))
    assert feature.shape == (2, 64) and [p.shape for p in preact] == [g.shape for g in groups]
    for p, g, name, e in zip(preact, groups, f.bn_before_relu, expected):
        assert {name + s for s in ('.weight', '.bias', '.running_mean', '.running_var')} <= params.keys()
        torch.testing.assert_close(p, F.batch_norm(g, params[name + '.running_mean'], params[name + '.running_var'],
                                                   params[name + '.weight'], params[name + '.bias']))
        torch.testing.assert_close(p, e)
        assert (p < 0).any()  # before the ReLU
    trained = [{k: v.clone() for k, v in params.items()} for _ in range(2)]
    with torch.no_grad():
        f(x, trained[0], True)
        f(x, trained[1], True, preact=True)
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in params)


def test_imagenet_networks_refuse_preact():
    student, params = define_student(18, 0.125, 10)
    teacher, folded = teacher_forward(IMAGENET_BLOCKS[18]), fold_batch_norm(params)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match='preact'):
        student(x, params, False, preact=True)
    with pytest.raises(TypeError, match='preact'):
        teacher(x, folded, preact=True)

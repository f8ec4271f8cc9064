import argparse
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import UserError
from models import shufflenetv2, zoo
from repdistiller_reference import REFERENCES

# Parameter counts of RepDistiller's modules for 100 classes (state dict without num_batches_tracked).
REPDISTILLER_COUNTS = {'resnet8x4': 1236292, 'resnet32x4': 7443780, 'resnet20': 279892, 'vgg8': 3967972,
                       'MobileNetV2': 831204, 'ShuffleV1': 972994, 'ShuffleV2': 1371708,
                       'ResNet50': 23758372, 'wrn_16_1': 181844}
ONE_PER_FAMILY = ['resnet8x4', 'ResNet50', 'wrn_16_1', 'vgg8', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2']


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Batch-2 convolutions are too small to share: with several threads the file ran ten times
    slower on a busy two-core machine (threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(arch, num_classes=100, seed=0):
    """RepDistiller's network with BN statistics and affine parameters away from their initial
    values, so that a BN in eval mode is not the identity."""
    torch.manual_seed(seed)
    module = REFERENCES[arch](num_classes)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return module


def save_repdistiller(module, path, **extra):
    torch.save({'epoch': 240, 'model': module.state_dict(), 'accuracy': torch.tensor(70.0), **extra}, path)
    return str(path)


def double(params):
    return {k: v.detach().double() for k, v in params.items()}


@pytest.mark.parametrize('arch', zoo.ARCHS)
def test_counts_names_and_shapes_match_repdistiller(arch):
    with torch.device('meta'):  # shapes only
        _, params = zoo.network(arch, 100)
        ref = REFERENCES[arch](100)
    theirs = {k: v.shape for k, v in ref.state_dict().items() if not k.endswith('num_batches_tracked')}
    assert {k: v.shape for k, v in zoo.to_repdistiller(params, arch).items()} == theirs
    count = sum(v.numel() for v in params.values())
    assert count == sum(s.numel() for s in theirs.values()) == REPDISTILLER_COUNTS.get(arch, count)
    assert all(v.dtype == torch.float32 and v.requires_grad == ('running' not in k) for k, v in params.items())


@pytest.mark.parametrize('arch', zoo.ARCHS)
def test_loaded_checkpoint_computes_what_repdistiller_computes(arch, tmp_path):
    ref = reference(arch)
    params = zoo.load_repdistiller(save_repdistiller(ref, tmp_path / 'ckpt_epoch_240.pth'), arch, 100)
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in params.values())
    f, _ = zoo.network(arch, 100)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, groups = f(x, double(params), False)
        feats, ref_logits = ref.double().eval()(x, is_feat=True)
    assert logits.shape == (2, 100) and [g.shape for g in groups] == [r.shape for r in feats[1:-1]]
    assert logits.abs().max() > 1e-3  # the comparison is not between vanishing numbers
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9 * ref_logits.abs().max().item())
    for g, r in zip(groups, feats[1:-1]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9 * r.abs().max().item())
    # the pooled feature is RepDistiller's feats[-1], the vector CC, RKD and PKT compare
    with torch.no_grad():
        pooled_logits, pooled_groups, feature = f(x, double(params), False, pooled=True)
    assert feature.shape == feats[-1].shape and feature.abs().max() > 1e-3
    torch.testing.assert_close(feature, feats[-1], rtol=1e-9, atol=1e-9 * feats[-1].abs().max().item())
    assert torch.equal(pooled_logits, logits) and all(torch.equal(a, b) for a, b in zip(pooled_groups, groups))
    # the stem's output is RepDistiller's feats[0], the first map FSP compares
    with torch.no_grad():
        stem_logits, stem_groups, stem_feature, preact, stem = f(x, double(params), False, stem=True)
    assert stem.shape == feats[0].shape and stem.abs().max() > 1e-3 and len(preact) == len(groups)
    torch.testing.assert_close(stem, feats[0], rtol=1e-9, atol=1e-9 * feats[0].abs().max().item())
    assert torch.equal(stem_logits, logits) and torch.equal(stem_feature, feature)
    assert all(torch.equal(a, b) for a, b in zip(stem_groups, groups))


@pytest.mark.parametrize('arch', zoo.ARCHS)
def test_pooled_feature_is_what_the_classifier_reads(arch):
    torch.manual_seed(0)
    f, params = zoo.network(arch, 10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = f(x, params, True)
        logits, groups, feature = f(x, params, True, pooled=True)
    assert len(plain) == 2 and feature.shape == (2, params['fc.weight'].shape[1])
    torch.testing.assert_close(logits, F.linear(feature, params['fc.weight'], params['fc.bias']))
    # pooled=False returns what it always did: the same logits and groups, bit for bit
    assert torch.equal(plain[0], logits) and len(plain[1]) == len(groups)
    assert all(torch.equal(a, b) for a, b in zip(plain[1], groups))


@pytest.mark.parametrize('arch', ONE_PER_FAMILY)
def test_training_mode_moves_running_statistics_like_repdistiller(arch):
    ref = reference(arch, seed=1).double().train()
    f, params = zoo.network(arch, 100)
    state = ref.state_dict()
    params = {k: state[zoo.repdistiller_name(arch, k)].clone() for k in params}
    before = {k: v.clone() for k, v in params.items() if 'running' in k}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, _ = f(x, params, True)
        _, ref_logits = ref(x, is_feat=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9 * ref_logits.abs().max().item())
    for k in before:
        assert not torch.equal(params[k], before[k])
        torch.testing.assert_close(params[k], state[zoo.repdistiller_name(arch, k)], rtol=1e-9, atol=1e-12)


def repdistiller_preact(ref, arch, x):
    """feats[1:-1] of RepDistiller's forward(x, is_feat=True, preact=True), read off the reference
    module (eval mode): for the families whose groups end in a block's closing ReLU, the value
    that ReLU is given (its `preact = out; out = F.relu(out)`), ShuffleV2's with the passed-through
    half before it; the WRN's BNs of models/wrn.py; VGG's blocks, which end in their BN;
    MobileNetV2's plain features (its forward ignores preact)."""
    family = zoo.NETWORKS[arch][0]
    feats, _ = ref(x, is_feat=True)
    if family == 'wrn':
        return [ref.block2.layer[0].bn1(feats[1]), ref.block3.layer[0].bn1(feats[2]), ref.bn1(feats[3])]
    if family == 'mobilenetv2':
        return feats[1:-1]
    if family == 'vgg':
        blocks = [getattr(ref, f'block{b}') for b in range(1, 5)]
    else:
        blocks = [layer[-1] for layer in (ref.layer1, ref.layer2, ref.layer3, getattr(ref, 'layer4', None)) if layer]
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for b in blocks]
    ref(x)
    for h in hooks:
        h.remove()
    if family == 'vgg':
        return [b(i) for b, i in zip(blocks, inputs)]
    preacts = []
    for block, i in zip(blocks, inputs):
        with mock.patch.object(F, 'relu', wraps=F.relu) as relu:
            block(i)
        closing = relu.call_args_list[-1].args[0]
        preacts.append(torch.cat([i[:, :i.shape[1] // 2], closing], 1) if family == 'shufflev2' else closing)
    return preacts


@pytest.mark.parametrize('arch', ONE_PER_FAMILY)
def test_preact_groups_are_repdistillers_pre_relu_features(arch):
    ref = reference(arch).double().eval()
    f, params = zoo.network(arch, 100)
    state = ref.state_dict()
    params = {k: state[zoo.repdistiller_name(arch, k)] for k in params}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, groups = f(x, params, False)
        logits_p, groups_p, feature, preact = f(x, params, False, preact=True)
        expected = repdistiller_preact(ref, arch, x)
    assert torch.equal(logits, logits_p) and len(groups_p) == len(preact) == len(expected) == len(groups)
    assert all(torch.equal(a, b) for a, b in zip(groups, groups_p))
    torch.testing.assert_close(logits, F.linear(feature, params['fc.weight'], params['fc.bias']))
    family = zoo.NETWORKS[arch][0]
    for g, p, e in zip(groups, preact, expected):
        torch.testing.assert_close(p, e, rtol=1e-9, atol=1e-9 * e.abs().max().item())
        if family == 'mobilenetv2':  # a linear bottleneck: no ReLU follows a stage
            assert torch.equal(p, g)
        elif family == 'shufflev2':
            assert (p < 0).any() and torch.equal(shufflenetv2.channel_shuffle(F.relu(p), 2), g)
        elif family != 'wrn':  # the WRN's BN relation is tested in test_resnet.py
            assert (p < 0).any() and torch.equal(F.relu(p), g)
    for name, p in zip(f.bn_before_relu or (), preact):
        assert {name + s for s in ('.weight', '.bias', '.running_mean', '.running_var')} <= params.keys()
        assert params[name + '.weight'].shape == (p.shape[1],)


# f.bn_before_relu under RepDistiller's module names, written from mdistiller's get_bn_before_relu
# (layer[-1].bn2 / .bn3, block2.layer[0].bn1, block{g}[-1], blocks[s][-1].conv[-1]).
BN_BEFORE_RELU = {
    'resnet8x4': ['layer1.0.bn2', 'layer2.0.bn2', 'layer3.0.bn2'],
    'resnet32x4': ['layer1.4.bn2', 'layer2.4.bn2', 'layer3.4.bn2'],
    'ResNet50': ['layer1.2.bn3', 'layer2.3.bn3', 'layer3.5.bn3', 'layer4.2.bn3'],
    'wrn_40_2': ['block2.layer.0.bn1', 'block3.layer.0.bn1', 'bn1'],
    'vgg8': ['block1.1', 'block2.1', 'block3.1', 'block4.1'],
    'vgg13': ['block1.4', 'block2.4', 'block3.4', 'block4.4'],
    'MobileNetV2': ['blocks.1.1.conv.7', 'blocks.2.2.conv.7', 'blocks.4.2.conv.7', 'blocks.6.0.conv.7'],
    'ShuffleV1': None, 'ShuffleV2': None,  # neither reference names them: no OFD teacher
}


@pytest.mark.parametrize('arch', zoo.ARCHS)
def test_bn_before_relu_names_mdistillers_batch_norms(arch):
    with torch.device('meta'):  # names and shapes only
        f, params = zoo.network(arch, 100)
        _, groups, _, preact = f(torch.zeros(1, 3, 32, 32), params, False, preact=True)
    if zoo.NETWORKS[arch][0] in ('shufflev1', 'shufflev2'):
        assert f.bn_before_relu is None
        return
    assert len(f.bn_before_relu) == len(groups)
    for name, p in zip(f.bn_before_relu, preact):
        assert params[name + '.weight'].shape == params[name + '.running_var'].shape == (p.shape[1],)
    names = [zoo.repdistiller_name(arch, n + '.weight')[:-len('.weight')] for n in f.bn_before_relu]
    assert names == BN_BEFORE_RELU.get(arch, names)


def test_base_prefix_selects_one_network_of_a_shared_dict():
    f, params = zoo.network('ShuffleV2', 10)
    shared = {'teacher.' + k: v for k, v in params.items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(f(x, shared, False, 'teacher.')[0], f(x, params, False)[0])


def test_unknown_architecture_lists_the_valid_names():
    with pytest.raises(UserError, match='mobile_half.*resnet8, resnet14.*ShuffleV2'):
        zoo.network('mobile_half', 100)


def test_accepts_a_bare_state_dict_dataparallel_names_and_saved_options(tmp_path):
    ref = reference('resnet8')
    expected = zoo.load_repdistiller(save_repdistiller(ref, tmp_path / 'a.pth'), 'resnet8', 100)
    torch.save({'module.' + k: v for k, v in ref.state_dict().items()}, tmp_path / 'b.pth')
    last = save_repdistiller(ref, tmp_path / 'resnet8_last.pth', opt=argparse.Namespace(model='resnet8'))
    for path in (tmp_path / 'b.pth', last):
        params = zoo.load_repdistiller(str(path), 'resnet8', 100)
        assert list(params) == list(expected)
        assert all(torch.equal(params[k], expected[k]) for k in params)


@pytest.mark.parametrize('arch,num_classes,message', [
    ('resnet20', 100, r'is not a RepDistiller resnet20 for 100 classes: it lacks layer1\.1\.conv1\.weight;'),
    ('resnet8x4', 100, r'it lacks layer1\.0\.downsample\.0\.weight'),
    ('wrn_16_1', 100, r'it lacks block1\.layer\.0\.conv1\.weight'),
    ('resnet8', 10, r'fc\.weight has shape \(100, 64\), expected \(10, 64\); check the architecture and the number'),
])
def test_refuses_another_architecture_or_class_count(tmp_path, arch, num_classes, message):
    path = save_repdistiller(REFERENCES['resnet8'](100), tmp_path / 'resnet8.pth')
    with pytest.raises(UserError, match=message) as e:
        zoo.load_repdistiller(path, arch, num_classes)
    assert '\n' not in str(e.value)


def test_refuses_extra_tensors(tmp_path):
    path = save_repdistiller(REFERENCES['resnet20'](100), tmp_path / 'resnet20.pth')
    with pytest.raises(UserError, match=r'it has unexpected layer1\.1\.conv1\.weight'):
        zoo.load_repdistiller(path, 'resnet8', 100)


def test_refuses_missing_and_damaged_files(tmp_path):
    with pytest.raises(UserError, match='nothing.pth does not exist'):
        zoo.load_repdistiller(str(tmp_path / 'nothing.pth'), 'resnet8', 100)
    path = save_repdistiller(REFERENCES['resnet8'](100), tmp_path / 'resnet8.pth')
    data = open(path, 'rb').read()
    for name, content in (('garbage.pth', b'not a checkpoint'), ('truncated.pth', data[:len(data) // 2])):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=f'cannot read RepDistiller checkpoint .*{name}') as e:
            zoo.load_repdistiller(str(tmp_path / name), 'resnet8', 100)
        assert '\n' not in str(e.value)
    torch.save({'model': nn.Linear(2, 2)}, tmp_path / 'module.pth')
    with pytest.raises(UserError, match=r'module.pth holds a pickled torch\.nn\.modules\.linear\.Linear.*state_dict'):
        zoo.load_repdistiller(str(tmp_path / 'module.pth'), 'resnet8', 100)
    torch.save({'model': [1, 2]}, tmp_path / 'list.pth')
    with pytest.raises(UserError, match='list.pth holds no state dict'):
        zoo.load_repdistiller(str(tmp_path / 'list.pth'), 'resnet8', 100)


def test_refuses_a_checkpoint_holding_nan_or_inf(tmp_path):
    """A teacher with a NaN weight makes every loss NaN, which read as the student diverging."""
    module = REFERENCES['resnet8'](100)
    with torch.no_grad():
        module.layer1[0].bn2.running_mean[1] = float('-inf')
    path = save_repdistiller(module, tmp_path / 'resnet8.pth')
    with pytest.raises(UserError, match=r'teacher .*resnet8.pth: layer1\.0\.bn2\.running_mean holds Inf values; '
                                        r'retrain the teacher') as e:
        zoo.load_repdistiller(path, 'resnet8', 100)
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('arch, head', [('wrn_16_1', ['bn']), ('MobileNetV2', ['bn1']), ('ShuffleV2', ['bn1']),
                                        ('resnet8', [])])
def test_mode_groups_trains_the_stem_and_groups_only_as_repdistillers_init_stage(arch, head):
    """RepDistiller's init stage: the student in eval mode but for get_feat_modules() (stem and
    groups). The batch norms after the last group keep their statistics and take no gradient; the
    rest is training mode, bit for bit."""
    torch.manual_seed(3)
    f, params = zoo.network(arch, 10)
    x = torch.randn(4, 3, 32, 32)
    trained = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    stems = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    _, groups, _, preact, stem = f(x, trained, True, stem=True)
    _, groups_g, _, preact_g, stem_g = f(x, stems, 'groups', stem=True)
    assert torch.equal(stem, stem_g) and all(torch.equal(a, b) for a, b in zip(groups, groups_g))
    moved = {k.rsplit('.', 2)[0] for k in params if k.endswith('running_mean') and not torch.equal(stems[k], params[k])}
    assert moved == {k.rsplit('.', 2)[0] for k in params if k.endswith('running_mean')} - set(head)
    sum(g.sum() for g in (*groups_g, *preact_g)).backward()
    for h in head:
        assert stems[h + '.weight'].grad is None and stems[h + '.bias'].grad is None
        assert not torch.equal(trained[h + '.running_mean'], params[h + '.running_mean'])  # training mode moves it
    assert all(stems[k].grad is not None for k in params if k.startswith('group') and stems[k].requires_grad)


@pytest.mark.parametrize('arch', ONE_PER_FAMILY)
def test_the_feature_map_is_the_map_whose_average_the_classifier_reads(arch):
    """feature_map=True adds, sixth, the map the global pool averages (SDD and CAT-KD apply the
    classifier to parts of it); the other outputs stay as stem=True gives them, in training mode too."""
    f, params = zoo.network(arch, 10)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        *outputs, feature_map = f(x, params, True, feature_map=True)
        stem = f(x, params, True, stem=True)
    logits, feature = outputs[0], outputs[2]
    torch.testing.assert_close(feature_map.mean((2, 3)), feature)
    torch.testing.assert_close(F.linear(feature_map.mean((2, 3)), params['fc.weight'], params['fc.bias']), logits)
    assert feature_map.shape[1] == params['fc.weight'].shape[1]
    torch.testing.assert_close(outputs[0], stem[0])
    torch.testing.assert_close(outputs[4], stem[4])

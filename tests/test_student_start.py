"""How a student starts: --init (the AT paper's draw or RepDistiller's per family), --student_params
(given weights, in the run's dtype) and --augment off (batches as stored)."""
import math
import os
from types import SimpleNamespace

import pytest
import torch

import cifar
from conftest import run_in_process
from datasets.cifar import MEAN, STD, Loader
from models import zoo
from models.init import initialize, resolve
from repdistiller_reference import REFERENCES

TINY = ['--batch_size', 50, '--nthread', 2, '--epochs', 1, '--weight_decay', 0]
ONE_PER_FAMILY = ['resnet8x4', 'ResNet50', 'wrn_40_2', 'vgg13', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2']


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def opt(**kw):
    return SimpleNamespace(**{'arch': 'resnet8', 'depth': 16, 'width': 1, 'init': 'auto', 'student_params': '',
                              'resume': '', **kw})


def test_auto_is_the_papers_draw_for_wrns_and_repdistillers_for_the_benchmark_networks():
    assert resolve('auto', 'wrn') == 'at' and resolve('auto', 'wrn_16_2') == 'crd'
    assert resolve('auto', 'resnet8x4') == 'crd' and resolve('at', 'resnet8x4') == 'at'
    torch.manual_seed(0)
    _, at = cifar.student(opt(arch='wrn', init='auto'), 10)
    torch.manual_seed(0)
    _, wrn = cifar.network('wrn', 16, 1, 10)
    assert all(torch.equal(at[k], wrn[k]) for k in wrn)  # the original code's WRN draw, unchanged
    scales = at['group0.block0.bn0.weight'].detach()
    assert 0 < float(scales.min()) and float(scales.max()) < 1


def spread(t):
    return float(t.double().std())


@pytest.mark.parametrize('arch', ONE_PER_FAMILY)
def test_crd_init_draws_each_layer_as_repdistillers_family_does(arch):
    torch.manual_seed(1)
    with torch.no_grad():
        params = {k: v.detach() for k, v in initialize(zoo.network(arch, 100)[1], zoo.family(arch), 'crd').items()}
    family = zoo.family(arch)
    for k, t in params.items():
        module, _, tensor = k.rpartition('.')
        if tensor in ('running_mean', 'running_var'):
            continue
        if module + '.running_mean' in params:
            assert torch.equal(t, torch.full_like(t, 1.0 if tensor == 'weight' else 0.0)), k
        elif t.dim() == 4:
            fan_in, fan_out = t.shape[1] * t[0][0].numel(), t.shape[0] * t[0][0].numel()
            if family.startswith('shuffle'):  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1 / math.sqrt(fan_in)
                assert float(t.abs().max()) <= bound and (t.numel() < 500 or float(t.abs().max()) > 0.9 * bound), k
            elif t.numel() >= 500:
                assert spread(t) == pytest.approx(math.sqrt(2 / fan_out), rel=0.15), k
        elif t.dim() == 2:
            if family in ('vgg', 'mobilenetv2'):
                assert spread(t) == pytest.approx(0.01, rel=0.1), k
            else:
                bound = 1 / math.sqrt(t.shape[1])
                assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.9 * bound, k
        elif tensor == 'bias' and params[module + '.weight'].dim() == 4:
            assert not t.any(), k  # VGG's conv biases
        else:  # the classifier's bias
            if family in ('vgg', 'mobilenetv2', 'wrn'):
                assert not t.any(), k
            else:
                assert 0 < float(t.abs().max()) <= 1 / math.sqrt(params[module + '.weight'].shape[1]), k


def test_at_init_is_left_as_drawn_and_the_cli_refuses_an_unknown_scheme(image_tree, tmp_path):
    torch.manual_seed(2)
    _, params = zoo.network('resnet8', 10)
    before = {k: v.clone() for k, v in params.items()}
    initialize(params, 'resnet', 'at')
    assert all(torch.equal(before[k], params[k]) for k in params)
    result = run_in_process(cifar.main, *TINY, '--dataroot', image_tree, '--init', 'xavier', '--save', 'logs/x',
                            cwd=tmp_path)
    assert result.returncode == 2 and "--init 'xavier' is not one of the choices" in result.stderr
    assert '--init' in result.stderr and not (tmp_path / 'logs' / 'x').exists()


def repdistiller_student(arch, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return REFERENCES[arch](10).to(dtype)


def trained_student(run_dir):
    state = torch.load(os.path.join(run_dir, 'model.pt7'), map_location='cpu', weights_only=True)
    return state['params']


@pytest.mark.parametrize('layout', ['repdistiller', 'mdistiller distiller', 'mdistiller student'])
def test_student_params_start_the_student_in_the_runs_dtype_without_rounding(layout, image_tree, tmp_path):
    module = repdistiller_student('resnet8', 3)
    state = {k: v for k, v in module.state_dict().items() if not k.endswith('num_batches_tracked')}
    if layout == 'repdistiller':
        saved = {'epoch': 240, 'model': state}
    elif layout == 'mdistiller distiller':  # its trainer saves the whole distiller, from DataParallel
        saved = {'model': {**{f'module.student.{k}': v for k, v in state.items()},
                           'module.teacher.conv1.weight': torch.zeros(1), 'module.conv_reg.weight': torch.zeros(1)}}
    else:
        saved = {'model': state}
    torch.save(saved, tmp_path / 'student.pth')
    # A learning rate so small that no weight moves in fp64: the run's weights are the file's.
    ok(run_in_process(cifar.main, *TINY, '--dataroot', image_tree, '--arch', 'resnet8', '--dtype', 'double',
                      '--lr', 1e-300, '--student_params', 'student.pth', '--save', 'logs/s', cwd=tmp_path))
    params = trained_student(tmp_path / 'logs' / 's')
    ours = {zoo.repdistiller_name('resnet8', k): v for k, v in params.items() if 'running' not in k}
    assert ours and all(v.dtype == torch.float64 for v in ours.values())
    for k in ours:  # rounding to fp32 on the way would move them by 1e-8 relative; lr moves the zeros by 1e-300
        torch.testing.assert_close(ours[k], state[k], rtol=0, atol=1e-290)


def test_student_params_from_a_model_pt7_and_refusals(image_tree, tmp_path):
    common = [*TINY, '--dataroot', image_tree, '--depth', 10]
    ok(run_in_process(cifar.main, *common, '--save', 'logs/first', cwd=tmp_path))
    first = trained_student(tmp_path / 'logs' / 'first')
    ok(run_in_process(cifar.main, *common, '--lr', 1e-30, '--student_params', 'logs/first/model.pt7',
                      '--save', 'logs/second', cwd=tmp_path))
    second = trained_student(tmp_path / 'logs' / 'second')
    assert all(torch.equal(first[k], second[k]) for k in first if 'conv' in k)
    wrong = run_in_process(cifar.main, *TINY, '--dataroot', image_tree, '--depth', 16,
                           '--student_params', 'logs/first/model.pt7', '--save', 'logs/third', cwd=tmp_path)
    assert wrong.returncode == 2 and 'logs/first/model.pt7 is not a model.pt7 wrn' in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1 and not (tmp_path / 'logs' / 'third').exists()
    missing = run_in_process(cifar.main, *common, '--student_params', 'none.pth', '--save', 'logs/fourth',
                             cwd=tmp_path)
    assert missing.returncode == 2 and 'student weights none.pth do not exist' in missing.stderr
    assert '--student_params' in missing.stderr and not (tmp_path / 'logs' / 'fourth').exists()


def test_each_member_of_a_cohort_trains_its_own_copy_of_student_params(image_tree, tmp_path):
    """Two members from one file train as two single runs would: neither moves the other's weights."""
    common = [*TINY, '--dataroot', image_tree, '--depth', 10, '--seed', 1]
    ok(run_in_process(cifar.main, *common, '--save', 'logs/first', cwd=tmp_path))
    start = [*common, '--student_params', 'logs/first/model.pt7']
    ok(run_in_process(cifar.main, *start, '--save', 'logs/alone', cwd=tmp_path))
    ok(run_in_process(cifar.main, *start, '--save', 'logs/pair', '--cohort',
                      '[{"name": "a", "seed": 1}, {"name": "b", "seed": 1}]', cwd=tmp_path))
    alone, first = trained_student(tmp_path / 'logs' / 'alone'), trained_student(tmp_path / 'logs' / 'first')
    assert not torch.equal(alone['conv0'], first['conv0'])
    for name in ('a', 'b'):
        member = trained_student(tmp_path / 'logs' / 'pair' / name)
        assert all(torch.equal(member[k], alone[k]) for k in alone), name


def test_the_learned_parts_start_the_same_with_and_without_student_params(tmp_path):
    """--student_params replaces the student's draw but not what comes after it from the same
    generator, so the methods' parts and a cohort's seeds mean what they meant."""
    o = opt(arch='resnet8')
    torch.manual_seed(4)
    _, drawn = cifar.student(o, 10)
    after = torch.rand(3)
    start = {k: torch.randn_like(v, dtype=torch.float64) for k, v in drawn.items()}
    torch.manual_seed(4)
    _, given = cifar.student(o, 10, start)
    assert torch.equal(torch.rand(3), after)
    assert all(given[k] is not start[k] and torch.equal(given[k], start[k]) for k in start)
    assert [k for k, v in given.items() if v.requires_grad] == [k for k, v in drawn.items() if v.requires_grad]


def test_augment_off_yields_the_stored_images_and_pad_0_still_flips():
    torch.manual_seed(5)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def batches(**kw):
        loader = Loader(images, torch.arange(64), batch_size=64, train=True, seed=3, **kw)
        loader.set_epoch(1)
        x, y, _, _ = next(iter(loader))
        return x, y

    x, y = batches(augment=False)
    torch.testing.assert_close(x, (images[y].float() - mean) / std)
    x, y = batches(pad=0)
    stored, mirrored = (images[y].float() - mean) / std, (images[y].flip(3).float() - mean) / std
    flipped = torch.tensor([not torch.equal(a, s) and torch.allclose(a, m) for a, s, m in zip(x, stored, mirrored)])
    kept = torch.tensor([torch.allclose(a, s) for a, s in zip(x, stored)])
    assert bool((flipped | kept).all()) and 16 < int(flipped.sum()) < 48  # the original code flips at pad 0 too


def test_momentum_at_decay_keep_is_a_rate_lowered_in_place_and_restart_a_new_optimizer(image_tree, tmp_path):
    """With a decay ratio of 1 the rate stays: keeping the momentum trains as no decay at all does
    (RepDistiller's adjust_learning_rate), restarting it does not (the AT code's new optimizer)."""
    common = [*TINY, '--dataroot', image_tree, '--depth', 10, '--dtype', 'double', '--reference', '--epochs', 2,
              '--seed', 1, '--lr_decay_ratio', 1]
    runs = {'none': ['--epoch_step', '[]'], 'keep': ['--epoch_step', '[2]', '--momentum_at_decay', 'keep'],
            'restart': ['--epoch_step', '[2]']}
    for name, extra in runs.items():
        ok(run_in_process(cifar.main, *common, *extra, '--save', f'logs/{name}', cwd=tmp_path))
    none, keep, restart = (trained_student(tmp_path / 'logs' / n) for n in ('none', 'keep', 'restart'))
    assert all(torch.equal(none[k], keep[k]) for k in none)
    assert not all(torch.equal(none[k], restart[k]) for k in none)

"""ImageNet ResNets against torchvision, the image-folder pipeline, and imagenet.py end to end."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import imagenet
from conftest import run_cli, run_in_process
from datasets.imagenet import ImageFolderLoader, center_crop_box, random_resized_crop_box
from engine.errors import UserError
from resnet import define_student, define_teacher, from_torchvision


def randomised(model):
    """A torchvision ResNet in eval mode with BN statistics and affine parameters far from their
    initial values, so that folding them is really tested."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


def torchvision_outputs(model, x):
    groups = []
    hooks = [getattr(model, f'layer{g}').register_forward_hook(lambda m, i, o: groups.append(o))
             for g in range(1, 5)]
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    return y, groups


def export_layout(model):
    """The original BN-folded export of a torchvision ResNet, written here independently of
    resnet.py: conv weights scaled by gamma / std, biases beta - mean * gamma / std, the
    shortcut's bias added to the block's second conv."""
    def fold(conv, bn):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale

    out = {}
    out['conv0.weight'], out['conv0.bias'] = fold(model.conv1, model.bn1)
    for g in range(4):
        for i, b in enumerate(getattr(model, f'layer{g + 1}')):
            base = f'group{g}.block{i}'
            out[base + '.conv0.weight'], out[base + '.conv0.bias'] = fold(b.conv1, b.bn1)
            out[base + '.conv1.weight'], out[base + '.conv1.bias'] = fold(b.conv2, b.bn2)
            if b.downsample is not None:
                out[base + '.conv_dim.weight'], shift = fold(b.downsample[0], b.downsample[1])
                out[base + '.conv1.bias'] = out[base + '.conv1.bias'] + shift
    out['fc.weight'], out['fc.bias'] = model.fc.weight, model.fc.bias
    return {k: v.detach().clone() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Networks

@pytest.mark.parametrize('depth', [18, 34])
def test_student_parameter_count_matches_torchvision(depth):
    model = getattr(torchvision.models, f'resnet{depth}')(weights=None)
    _, params = define_student(depth, 1)
    trainable = sum(v.numel() for v in params.values() if v.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters())  # 11,689,512 for ResNet-18
    assert sum(v.numel() for v in params.values()) == sum(
        v.numel() for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked'))
    assert 'group1.block0.bn_dim.running_var' in params and 'group0.block0.conv_dim' not in params
    assert params['conv0'].shape == (64, 3, 7, 7) and not params['bn0.running_mean'].requires_grad


@pytest.mark.parametrize('mode', [False, True])
def test_student_computes_torchvision_resnet18(mode):
    model = randomised(torchvision.models.resnet18(weights=None, num_classes=10)).train(mode)
    f, params = define_student(18, 1, 10)
    params = {k: v.clone() for k, v in from_torchvision(model.state_dict(), 'model')[0].items()}
    x = torch.randn(2, 3, 64, 64)
    y_ref, groups_ref = torchvision_outputs(model, x)
    y, groups = f(x, params, mode)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(groups, groups_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    if mode:
        torch.testing.assert_close(params['group2.block0.bn_dim.running_mean'],
                                   model.layer3[0].downsample[1].running_mean)


@pytest.mark.parametrize('depth', [18, 34])
@pytest.mark.parametrize('layout', ['torchvision', 'export'])
def test_teacher_matches_torchvision_in_eval_mode(depth, layout, tmp_path):
    model = randomised(getattr(torchvision.models, f'resnet{depth}')(weights=None, num_classes=7))
    path = tmp_path / 'teacher.pth'
    torch.save(model.state_dict() if layout == 'torchvision' else export_layout(model), path)
    f, params = define_teacher(str(path))
    assert params['fc.weight'].shape == (7, 512) and not any('bn' in k for k in params)
    x = torch.randn(2, 3, 64, 64)
    y_ref, groups_ref = torchvision_outputs(model, x)
    with torch.no_grad():
        y, groups = f(x, {'teacher.' + k: v for k, v in params.items()}, 'teacher.')
    scale = y_ref.abs().max()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * scale)
    assert [g.shape[1:] for g in groups] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    for g, r in zip(groups, groups_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * r.abs().max())


def test_a_student_checkpoint_can_teach(tmp_path):
    f_s, params = define_student(18, 0.5, 4)
    for k, v in params.items():
        if k.endswith('running_var'):
            v.uniform_(0.5, 2)
    torch.save({'params': {'student.' + k: v for k, v in params.items()}, 'optimizer': None, 'epoch': 3},
               tmp_path / 'model.pt7')
    f_t, teacher = define_teacher(str(tmp_path / 'model.pt7'))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(f_t(x, teacher)[0], f_s(x, params, False)[0], rtol=1e-4, atol=1e-4)


def test_unusable_teacher_files_are_user_errors(tmp_path):
    (tmp_path / 'junk.pth').write_bytes(b'not a torch file')
    torch.save({'conv1.weight': torch.zeros(1), 'layer1.0.conv3.weight': torch.zeros(1)}, tmp_path / 'bottleneck.pth')
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd['layer2.0.conv1.weight'] = torch.zeros(128, 64, 1, 1)
    torch.save(sd, tmp_path / 'misshaped.pth')
    del sd['layer4.1.conv1.weight']
    torch.save(sd, tmp_path / 'short.pth')
    sd = torchvision.models.resnet34(weights=None).state_dict()
    del sd['layer3.5.bn2.running_var']
    torch.save(sd, tmp_path / 'incomplete.pth')
    for name, message in [('missing.pth', 'do not exist'), ('junk.pth', 'cannot read'),
                          ('bottleneck.pth', 'unexpected tensor layer1.0.conv3.weight'),
                          ('misshaped.pth', 'layer2.0.conv1.weight has shape (128, 64, 1, 1)'),
                          ('short.pth', 'blocks per group: [2, 2, 2, 1]'),
                          ('incomplete.pth', 'ResNet-34 teacher: it lacks group2.block5.bn1.running_var')]:
        with pytest.raises(UserError, match=re.escape(message)):
            define_teacher(str(tmp_path / name))


# ----------------------------------------------------------------------------------------------
# Input pipeline

def make_image_folder(root, n_train=2, n_val=1, classes=3):
    """root/train/<class>/*.jpg and root/val/<class>/*.png of assorted sizes, the mean colour
    depending on the class."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in range(classes):
            os.makedirs(root / split / f'n{c:08d}')
            for i in range(n):
                shape = (40 + 9 * i, 56 - 5 * c, 3)
                im = np.clip(rng.integers(0, 60, shape) + 80 * c, 0, 255).astype(np.uint8)
                Image.fromarray(im).save(root / split / f'n{c:08d}' / f'{i}.{"jpg" if split == "train" else "png"}')
    return root


def test_crop_boxes_stay_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    for width, height in [(500, 375), (40, 300), (224, 224)]:
        for _ in range(50):
            left, top, right, bottom = random_resized_crop_box(width, height, generator)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert 0.07 * width * height <= (right - left) * (bottom - top)
    assert center_crop_box(512, 256) == (144.0, 16.0, 368.0, 240.0)  # resize 256, centre crop 224


def test_loader_batches_depend_only_on_seed_and_epoch(tmp_path):
    root = make_image_folder(tmp_path, n_train=3)
    loader = ImageFolderLoader(str(root / 'train'), 4, train=True, seed=5, nthread=0, channels_last=True)
    loader.set_epoch(1)
    first = list(loader)
    assert len(loader) == len(first) == 3 and [len(y) for _, y, _, _ in first] == [4, 4, 1]
    assert [share for _, _, share, _ in first] == [1.0] * 3
    x, y, _, _ = first[0]
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    labels = sorted(torch.cat([y for _, y, _, _ in first]).tolist())
    assert abs(x.mean().item()) < 3 and labels == [0] * 3 + [1] * 3 + [2] * 3
    workers = ImageFolderLoader(str(root / 'train'), 4, train=True, seed=5, nthread=2)
    workers.set_epoch(1, skip=1)
    rest = list(workers)
    assert len(rest) == 2 and rest[0][0].is_contiguous()
    for (a, b, _, i), (c, d, _, j) in zip(first[1:], rest):
        assert torch.equal(a, c) and torch.equal(b, d) and torch.equal(i, j)
    index = torch.cat([i for _, _, _, i in first])
    assert sorted(index.tolist()) == list(range(9))  # the positions of the folder's images
    assert torch.equal(loader.labels[index], torch.cat([y for _, y, _, _ in first]))
    loader.set_epoch(2)
    assert not torch.equal(next(iter(loader))[0], first[0][0])


# ----------------------------------------------------------------------------------------------
# imagenet.py end to end

def log_lines(run_dir):
    with open(os.path.join(run_dir, 'log.txt')) as f:
        return [json.loads(line[len('json_stats: '):]) for line in f]


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_at_student_of_a_torchvision_teacher_trains_logs_and_resumes(tmp_path):
    root = make_image_folder(tmp_path / 'images')
    torch.save(randomised(torchvision.models.resnet18(weights=None, num_classes=3)).state_dict(),
               tmp_path / 'resnet18.pth')
    common = ['--imagenetpath', root, '--depth', 18, '--width', 0.25, '--teacher_params', 'resnet18.pth',
              '--batch_size', 4, '--nthread', 0, '--beta', 1e3, '--alpha', 0.9, '--seed', 1, '--save', 'logs/at',
              '--factt_beta', 0.1, '--aux_weight', 0.3]  # four F-ActT maps 16..128 -> 64..512 channels
    out = ok(run_cli('imagenet.py', *common, '--epochs', 1, cwd=tmp_path))
    assert '(1/1), test_acc' in out.stdout
    ok(run_cli('imagenet.py', *common, '--epochs', 2, '--resume', 'logs/at/model.pt7', cwd=tmp_path))
    log = log_lines(tmp_path / 'logs/at')
    assert [r['epoch'] for r in log] == [1, 2]
    r = log[-1]
    assert r['num_classes'] == 3 and r['teacher_params'] == 'resnet18.pth' and r['depth'] == 18
    _, student = define_student(18, 0.25, 3)
    assert r['n_parameters'] == sum(v.numel() for v in student.values())
    assert 0 <= r['test_acc'] <= r['test_top3'] == 100 and 0 <= r['train_acc'] <= r['train_top3'] == 100
    assert len(r['at_losses']) == 4 and len(r['factt_losses']) == 4 and len(r['aux_losses']) == 2
    for mean, std in r['at_losses']:
        assert mean > 0 and math.isfinite(mean) and std is not None
    ckpt = torch.load(tmp_path / 'logs/at/model.pt7', map_location='cpu', weights_only=True)
    assert ckpt['epoch'] == 2
    teacher = define_teacher(str(tmp_path / 'resnet18.pth'))[1]
    aux = {k for k in ckpt['params'] if k.startswith('aux.')}
    assert {'aux.factt3.conv', 'aux.head1.fc.weight'} <= aux
    assert set(ckpt['params']) - aux == {'student.' + k for k in student} | {'teacher.' + k for k in teacher}
    for k, v in teacher.items():  # the teacher is folded once and never trained
        assert torch.equal(ckpt['params']['teacher.' + k], v), k


def test_a_cohort_of_students_shares_the_teacher(tmp_path):
    """imagenet.py takes --cohort as cifar.py does: each member an ordinary run in its folder."""
    root = make_image_folder(tmp_path / 'images')
    torch.save(randomised(torchvision.models.resnet18(weights=None, num_classes=3)).state_dict(),
               tmp_path / 'resnet18.pth')
    os.makedirs(root / 'train/n00000001/more')  # a class's sub-folders hold its images too
    Image.new('RGB', (48, 40), (80, 80, 80)).save(root / 'train/n00000001/more/extra.jpg')
    members = '[{"name": "at", "seed": 1, "beta": 1000}, {"name": "kd", "seed": 2, "alpha": 0.9}]'
    ok(run_in_process(imagenet.main, '--imagenetpath', root, '--depth', 18, '--width', 0.25, '--teacher_params',
                      'resnet18.pth', '--batch_size', 4, '--nthread', 0, '--epochs', 1, '--save', 'logs/row',
                      '--cohort', members, cwd=tmp_path))
    for name, seed in (('at', 1), ('kd', 2)):
        [line] = log_lines(tmp_path / 'logs/row' / name)
        assert line['seed'] == seed and line['data_seed'] == 1 and line['save'] == f'logs/row/{name}'
        assert len(line['at_losses']) == 4 and 'test_top3' in line
        assert (line['n_train'], line['n_test']) == (7, 3)
    at, kd = (torch.load(tmp_path / 'logs/row' / n / 'model.pt7', map_location='cpu', weights_only=True)['params']
              for n in ('at', 'kd'))
    assert not torch.equal(at['student.conv0'], kd['student.conv0'])  # each from its own seed
    assert torch.equal(at['teacher.conv0.weight'], kd['teacher.conv0.weight'])


def test_student_params_start_the_student_from_a_torchvision_state_dict_or_a_model_pt7(tmp_path):
    """The file's tensors, batch norms and their statistics included, in the run's dtype; a cohort's
    members each from a copy of them; files that do not fit are refused in one line."""
    root = make_image_folder(tmp_path / 'images')
    model = randomised(torchvision.models.resnet18(weights=None, num_classes=3))
    model.fc.weight.data.mul_(0.3)  # far from any draw
    torch.save(model.state_dict(), tmp_path / 'start.pth')
    common = ['--imagenetpath', root, '--depth', 18, '--batch_size', 4, '--nthread', 0, '--epochs', 1,
              '--dtype', 'double', '--lr', 1e-300, '--weight_decay', 0]
    ok(run_in_process(imagenet.main, *common, '--student_params', 'start.pth', '--save', 'logs/tv', cwd=tmp_path))
    trained = torch.load(tmp_path / 'logs/tv/model.pt7', map_location='cpu', weights_only=True)
    params = {**trained['params'], **(trained.get('stats') or {})}
    expected, names = from_torchvision(model.state_dict(), 'start.pth')
    for k, v in expected.items():
        if 'running' in k:  # training mode moved them; the file's values were the start
            continue
        assert params[k].dtype == torch.float64, k
        torch.testing.assert_close(params[k], v.double(), rtol=0, atol=1e-290, msg=names[k])
    ok(run_in_process(imagenet.main, *common, '--student_params', 'logs/tv/model.pt7', '--save', 'logs/pair',
                      '--cohort', '[{"name": "a", "seed": 1}, {"name": "b", "seed": 2}]', cwd=tmp_path))
    a, b = (torch.load(tmp_path / 'logs/pair' / n / 'model.pt7', map_location='cpu', weights_only=True)['params']
            for n in 'ab')
    assert torch.equal(a['conv0'], params['conv0']) and torch.equal(b['conv0'], params['conv0'])
    for flags, message in [(['--width', 0.5], 'start.pth is not a ResNet-18 of --width 0.5 for 3 classes: bn1.bias has '
                                               'shape (64,), expected (32,); check --depth'),
                           (['--depth', 34], 'start.pth is not a ResNet-34 of --width 1 for 3 classes: it lacks'),
                           (['--student_params', 'none.pth'], 'student weights none.pth do not exist; pass a '
                                                              'torchvision resnet18/34 state dict')]:
        result = run_in_process(imagenet.main, *common, '--student_params', 'start.pth', *flags, '--save', 'logs/no',
                                cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
            result.stderr
        assert not (tmp_path / 'logs/no').exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    root = make_image_folder(tmp_path / 'images', n_train=1)
    for args, message in [([], '--imagenetpath is required'),
                          (['--imagenetpath', root, '--depth', 50], '--depth 50 is not'),
                          (['--imagenetpath', tmp_path / 'none'], 'none/train does not exist')]:
        with pytest.raises(SystemExit) as stop:
            imagenet.main([*map(str, args), '--save', str(tmp_path / 'logs/x'), '--nthread', '0'])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), tmp_path / 'five.pth')
    result = run_cli('imagenet.py', '--imagenetpath', root, '--teacher_params', 'five.pth', '--nthread', 0,
                     '--save', 'logs/x', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        'imagenet.py: error: teacher five.pth predicts 5 classes, the data has 3; pass a teacher '
        'trained on these classes']
    assert not os.path.exists(tmp_path / 'logs/x')


def test_a_teacher_holding_nan_or_inf_is_refused_naming_the_tensor(tmp_path):
    """Loaded, it would make every loss NaN, reported as the student diverging."""
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd['layer2.0.bn1.running_var'][3] = float('nan')
    torch.save(sd, tmp_path / 'nan.pth')
    with pytest.raises(UserError, match=re.escape('teacher ') + '.*nan.pth: layer2.0.bn1.running_var holds NaN'):
        define_teacher(str(tmp_path / 'nan.pth'))
    params = {k: v.detach() for k, v in define_student(18, 0.25, 3)[1].items()}
    params['fc.weight'][0, 0] = float('inf')
    torch.save({'params': params, 'optimizer': None, 'epoch': 1}, tmp_path / 'model.pt7')
    with pytest.raises(UserError, match='model.pt7: fc.weight holds Inf values; retrain the teacher'):
        define_teacher(str(tmp_path / 'model.pt7'))


@pytest.mark.parametrize('nthread', [0, 1])
def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, nthread):
    """Pillow warns above MAX_IMAGE_PIXELS and would decode it all the same; the worker's
    error reaches the user as one line."""
    root = make_image_folder(tmp_path / 'images')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1500)  # the images hold 1,600 to 2,800 pixels
    loader = ImageFolderLoader(str(root / 'val'), batch_size=3, train=False, nthread=nthread)
    with pytest.raises(UserError) as e:
        next(iter(loader))
    assert re.fullmatch(r'\S*/val/n00000000/0.png is refused as a decompression bomb \(.*\); remove the file '
                        r'or shrink the image', str(e.value)), str(e.value)

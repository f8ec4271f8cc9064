"""visualize.py: the maps it draws, and its command line on a CIFAR student and teacher made by
cifar.py in the test and on an ImageNet run written here with the real ImageNet networks."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import visualize
from conftest import check_png, run_cli
from resnet import define_student, define_teacher

TINY = ['--depth', 10, '--batch_size', 32, '--nthread', 2, '--epochs', 1]


def reference_map(x, size):
    """The attention map written out: mean over channels of x^2, divided by its L2 norm, upsampled."""
    q = x.pow(2).mean(1)
    q = q / q.flatten(1).norm(dim=1).view(-1, 1, 1)
    return F.interpolate(q[:, None], size=size, mode='bilinear', align_corners=False)[:, 0]


def test_maps_follow_the_at_definition_and_a_group_shares_one_scale():
    torch.manual_seed(0)
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    teacher = [3 * torch.randn(2, 6, 8, 8), torch.randn(2, 16, 4, 4)]
    columns = visualize.attention_columns([('student', (None, student)), ('teacher', (None, teacher))], (16, 16))
    assert [title for title, _ in columns] == ['student\ngroup 0, 8x8', 'teacher\ngroup 0, 8x8',
                                               'student\ngroup 1, 4x4', 'teacher\ngroup 1, 4x4']
    for g in range(2):
        s, t = reference_map(student[g], (16, 16)), reference_map(teacher[g], (16, 16))
        scale = torch.maximum(s.amax(dim=(1, 2)), t.amax(dim=(1, 2))).view(-1, 1, 1)
        torch.testing.assert_close(columns[2 * g][1], s / scale)
        torch.testing.assert_close(columns[2 * g + 1][1], t / scale)
        assert columns[2 * g][1].shape == (2, 16, 16)


def test_cifar_student_beside_its_teacher_and_a_run_without_teacher(image_tree, tmp_path, capsys, monkeypatch):
    for args in (['--width', 1, '--seed', 1, '--save', 'logs/teacher'],
                 ['--width', 0.5, '--seed', 2, '--save', 'logs/at', '--teacher_id', 'teacher', '--beta', 1e3]):
        made = run_cli('cifar.py', *TINY, *args, '--dataroot', image_tree, cwd=tmp_path)
        assert made.returncode == 0, made.stderr[-2000:]

    drawn = run_cli('visualize.py', 'logs/at', '--n', 3, '--out', 'at.png', cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert 'attention maps of 3 test images written to at.png' in drawn.stdout
    at = check_png(tmp_path / 'at.png', 600, 250)
    monkeypatch.chdir(tmp_path)
    visualize.main(['logs/teacher', '--n', '3', '--out', 'teacher.png', '--dataroot', image_tree])
    alone = check_png(tmp_path / 'teacher.png', 300, 250)
    # input + 3 groups x (student, teacher) panels against input + 3 groups
    assert at.shape[0] == alone.shape[0] and at.shape[1] > 1.5 * alone.shape[1]

    for args, message in [(['logs/none', '--out', 'x.png'], 'logs/none/log.txt does not exist'),
                          (['logs/at', '--n', '41', '--out', 'x.png'], '--n 41 is more than the 40 test images'),
                          (['logs/at', '--out', 'maps.gif'], 'name a .png, .pdf, .svg file')]:
        with pytest.raises(SystemExit) as stop:
            visualize.main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_imagenet_student_and_teacher(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(tmp_path / f'images/val/n{c:08d}')
        for i in range(2):
            im = np.clip(rng.integers(0, 80, (260 + 20 * i, 300 - 30 * c, 3)) + 70 * c, 0, 255).astype(np.uint8)
            Image.fromarray(im).save(tmp_path / f'images/val/n{c:08d}/{i}.png')
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / 'resnet18.pth')
    _, student = define_student(18, 0.25, 3)
    _, teacher = define_teacher(str(tmp_path / 'resnet18.pth'))
    os.makedirs(tmp_path / 'logs/at')
    torch.save({'params': {**{'student.' + k: v for k, v in student.items()},
                           **{'teacher.' + k: v for k, v in teacher.items()}}, 'optimizer': {}, 'epoch': 1},
               tmp_path / 'logs/at/model.pt7')
    record = {'imagenetpath': 'images', 'depth': 18, 'width': 0.25, 'teacher_params': 'resnet18.pth',
              'beta': 1000.0, 'epochs': 1, 'epoch': 1, 'test_acc': 33.3, 'test_top3': 100.0}
    with open(tmp_path / 'logs/at/log.txt', 'w') as f:
        f.write('json_stats: ' + json.dumps(record) + '\n')

    monkeypatch.chdir(tmp_path)  # the log's paths are relative, as imagenet.py writes them
    visualize.main(['logs/at', '--n', '2', '--out', 'imagenet.png'])
    pixels = check_png(tmp_path / 'imagenet.png', 900, 200)  # input + 4 groups x 2 networks
    assert pixels.shape[1] > 3 * pixels.shape[0]

"""options.py and the image-tree rules: every flag's invalid values and every defect of a tree
are refused before anything is loaded or written, with one line on stderr and exit code 2.

Most of the table runs cifar.main / imagenet.main in this process (a subprocess costs seconds of
imports each); a few cases go through the real command line. In-process, the step after the
checks (start_runs) and image decoding are replaced by tripwires, so a refusal that came late
fails the test instead of loading data."""
import hashlib
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import cifar
import imagenet
import methods
from conftest import make_image_tree, run_cli
from datasets import cifar as cifar_data
from datasets.cifar import load_cifar
from engine.errors import UserError
from engine.options import CIFAR_RULES, IMAGENET_RULES, RULES, check_option


def make_image_folder(root, classes=3):
    """root/train/<class>/0.png and root/val/<class>/0.png, 40x40."""
    for split in ('train', 'val'):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f'n{c}'))
            Image.new('RGB', (40, 40), (80 * c, 0, 0)).save(os.path.join(root, split, f'n{c}', '0.png'))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A working directory holding good and broken data, files where folders belong, and runs."""
    root = tmp_path_factory.mktemp('options')
    good = make_image_tree(str(root / 'data'), n_train=20, n_test=10)
    (root / 'data/train/class0/notes.txt').write_text('stray files are skipped')
    for name in ('renamed', 'empty_class', 'stray_only', 'extra_test'):
        shutil.copytree(good, root / name)
    os.rename(root / 'renamed/test/class3', root / 'renamed/test/class3x')
    for f in os.listdir(root / 'empty_class/train/class3'):
        os.remove(root / 'empty_class/train/class3' / f)
    for f in os.listdir(root / 'stray_only/train/class5'):
        os.remove(root / 'stray_only/train/class5' / f)
    (root / 'stray_only/train/class5/readme.txt').write_text('no images here')
    shutil.copytree(root / 'data/test/class9', root / 'extra_test/test/class10')

    make_image_folder(str(root / 'inet'))
    shutil.copytree(root / 'inet', root / 'inet_renamed')
    os.rename(root / 'inet_renamed/val/n2', root / 'inet_renamed/val/n2x')
    shutil.copytree(root / 'inet', root / 'inet_empty')
    os.remove(root / 'inet_empty/train/n1/0.png')

    (root / 'afile').write_text('a file where a folder belongs')
    os.makedirs(root / 'weights_dir')
    os.makedirs(root / 'logs/run')
    (root / 'logs/run/model.pt7').write_bytes(b'\0' * 10)
    os.makedirs(root / 'logs/nolog')
    os.makedirs(root / 'logs/nockpt')
    (root / 'logs/nockpt/log.txt').write_text('json_stats: {"depth": 10, "width": 1}\n')
    shutil.copytree(root / 'logs/nockpt', root / 'logs/teacher')
    (root / 'logs/teacher/model.pt7').write_bytes(b'\0' * 10)  # the checks look, they do not read
    return root


def fingerprint(root):
    """Every folder and file under root, with each file's contents."""
    seen = {}
    for folder, _, files in os.walk(root):
        seen[folder] = 'folder'
        for name in files:
            with open(os.path.join(folder, name), 'rb') as f:
                seen[os.path.join(folder, name)] = hashlib.sha256(f.read()).hexdigest()
    return seen


class Reached(Exception):
    """Raised by the tripwires: the checks let the run through."""


@pytest.fixture
def tripwires(monkeypatch, workdir):
    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(cifar, 'start_runs', reached)
    monkeypatch.setattr(imagenet, 'start_runs', reached)
    monkeypatch.setattr(cifar_data, 'decode_images', reached)
    return workdir


SCRIPTS = {'cifar.py': (cifar.main, ['--dataroot', 'data', '--save', 'logs/new', '--epochs', 1]),
           'imagenet.py': (imagenet.main, ['--imagenetpath', 'inet', '--save', 'logs/new', '--nthread', 0])}

# (flag the case is about, extra arguments, phrases the error line must hold)
CIFAR_CASES = [
    ('depth', ['--depth', 18], ['--depth 18 is not 6n+4 (n >= 1)', 'use e.g. 16']),
    ('depth', ['--depth', 4], ['--depth 4 is not 6n+4']),
    ('width', ['--width', 0], ['--width 0.0 gives no channels']),
    ('width', ['--width', 0.01], ['--width 0.01 gives no channels']),
    ('width', ['--width', 'nan'], ['--width nan is not a finite number']),
    ('width', ['--width', 'inf'], ['--width inf is not a finite number']),
    ('nthread', ['--nthread', -1], ['--nthread -1 is negative']),
    ('batch_size', ['--batch_size', 0], ['--batch_size 0 is below 1']),
    ('epochs', ['--epochs', 0], ['--epochs 0 is below 1']),
    ('lr', ['--lr', -1], ['--lr -1.0 is not positive', 'learning rate > 0']),
    ('lr', ['--lr', 0], ['--lr 0.0 is not positive']),
    ('lr', ['--lr', 'nan'], ['--lr nan is not a finite number']),
    ('weight_decay', ['--weight_decay', -1], ['--weight_decay -1.0 is negative']),
    ('weight_decay', ['--weight_decay', 'inf'], ['--weight_decay inf is not a finite number']),
    ('epoch_step', ['--epoch_step', '60,120'], ["--epoch_step '60,120' is not a JSON list", '[60,120,160]']),
    ('epoch_step', ['--epoch_step', '[120,60]'], ["--epoch_step '[120,60]'", 'strictly increasing']),
    ('epoch_step', ['--epoch_step', '[60,60]'], ["--epoch_step '[60,60]'", 'strictly increasing']),
    ('epoch_step', ['--epoch_step', '[0,60]'], ["--epoch_step '[0,60]'", 'epochs >= 1']),
    ('epoch_step', ['--epoch_step', '[-3]'], ["--epoch_step '[-3]'"]),
    ('epoch_step', ['--epoch_step', '[1.5]'], ["--epoch_step '[1.5]'"]),
    ('epoch_step', ['--epoch_step', '[true]'], ["--epoch_step '[true]'"]),
    ('epoch_step', ['--epoch_step', '{"60": 1}'], ['--epoch_step \'{"60": 1}\'']),
    ('lr_decay_ratio', ['--lr_decay_ratio', 0], ['--lr_decay_ratio 0.0 is not positive', 'or 1 to keep']),
    ('lr_decay_ratio', ['--lr_decay_ratio', -0.2], ['--lr_decay_ratio -0.2 is not positive']),
    ('lr_decay_ratio', ['--lr_decay_ratio', 'nan'], ['--lr_decay_ratio nan is not a finite number']),
    ('randomcrop_pad', ['--randomcrop_pad', -1], ['--randomcrop_pad -1.0 is not a whole number in [0, 32)']),
    ('randomcrop_pad', ['--randomcrop_pad', 32], ['--randomcrop_pad 32.0 is not a whole number in [0, 32)']),
    ('randomcrop_pad', ['--randomcrop_pad', 40], ['--randomcrop_pad 40.0', '0 (no crop) up to 31']),
    ('randomcrop_pad', ['--randomcrop_pad', 2.5], ['--randomcrop_pad 2.5 is not a whole number']),
    ('randomcrop_pad', ['--randomcrop_pad', 'nan'], ['--randomcrop_pad nan is not a finite number']),
    ('crop_padding', ['--crop_padding', 'constant'], ["--crop_padding 'constant' is not one of the choices",
                                                      'use one of reflect, zero']),
    ('normalization', ['--normalization', 'imagenet'], ["--normalization 'imagenet' is not one of the choices",
                                                        'use one of cifar10, cifar100']),
    ('arch', ['--arch', 'mobile_half'], ["--arch 'mobile_half' is not a network here", 'use wrn (sized by',
                                         'MobileNetV2']),
    ('arch', ['--arch', 'WRN'], ["--arch 'WRN' is not a network here"]),
    ('depth', ['--arch', 'vgg8', '--depth', 40], ['--depth sizes the Wide ResNet of --arch wrn',
                                                  '--arch vgg8 is a fixed network; drop --depth 40']),
    ('width', ['--arch', 'resnet8x4', '--width', 2], ['drop --width 2, or use --arch wrn']),
    ('teacher_arch', ['--teacher_arch', 'resnet9', '--teacher_params', 'x.pth'],
     ["--teacher_arch 'resnet9' is not a network of the CRD benchmark", 'resnet32x4']),
    ('teacher_arch', ['--teacher_arch', 'resnet8'], ['--teacher_arch resnet8 names the network of a --teacher_params',
                                                     'add --teacher_params FILE']),
    ('teacher_params', ['--teacher_params', 'x.pth'], ['--teacher_params x.pth needs --teacher_arch']),
    ('teacher_params', ['--teacher_params', 'x.pth', '--teacher_arch', 'resnet8', '--teacher_id', 'teacher'],
     ['--teacher_id and --teacher_params both name a teacher; give one']),
    ('teacher_params', ['--teacher_params', 'missing.pth', '--teacher_arch', 'resnet8'],
     ['teacher weights missing.pth do not exist', 'RepDistiller checkpoint']),
    ('teacher_params', ['--teacher_params', 'weights_dir', '--teacher_arch', 'resnet8'],
     ['teacher weights weights_dir is a directory']),
    ('student_params', ['--student_params', 'missing.pth'], ['student weights missing.pth do not exist',
                                                             'mdistiller checkpoint of --arch']),
    ('student_params', ['--student_params', 'weights_dir'], ['student weights weights_dir is a directory without a '
                                                             'model.pt7']),
    ('init', ['--init', 'kaiming'], ["--init 'kaiming' is not one of the choices", 'use one of auto, at, crd']),
    ('augment', ['--augment', 'no'], ["--augment 'no' is not one of the choices", 'use one of on, off']),
    ('momentum_at_decay', ['--momentum_at_decay', 'reset'], ["--momentum_at_decay 'reset' is not one of the choices",
                                                            'use one of restart, keep']),
    ('temperature', ['--temperature', 0], ['--temperature 0.0 is not positive', 'T > 0']),
    ('temperature', ['--temperature', -1], ['--temperature -1.0 is not positive']),
    ('temperature', ['--temperature', 'inf'], ['--temperature inf is not a finite number']),
    ('alpha', ['--alpha', 2], ['--alpha 2.0 is outside [0, 1]']),
    ('alpha', ['--alpha', -0.1], ['--alpha -0.1 is outside [0, 1]']),
    ('alpha', ['--alpha', 'nan'], ['--alpha nan is not a finite number']),
    ('beta', ['--beta', -1], ['--beta -1.0 is negative; a loss weight is 0 (off) or positive']),
    ('beta', ['--beta', 'nan'], ['--beta nan is not a finite number']),
    ('grad_beta', ['--grad_beta', -1], ['--grad_beta -1.0 is negative']),
    ('sym_beta', ['--sym_beta', -1], ['--sym_beta -1.0 is negative']),
    ('factt_beta', ['--factt_beta', -1], ['--factt_beta -1.0 is negative']),
    ('fitnet_beta', ['--fitnet_beta', 'nan'], ['--fitnet_beta nan is not a finite number']),
    ('cos_beta', ['--cos_beta', 'inf'], ['--cos_beta inf is not a finite number']),
    ('aux_weight', ['--aux_weight', -1], ['--aux_weight -1.0 is negative']),
    ('at_p', ['--at_p', 0], ['--at_p 0.0 is not positive', '1, 2 or 4']),
    ('at_p', ['--at_p', 'nan'], ['--at_p nan is not a finite number']),
    ('beta_decay', ['--beta_decay', 0], ['--beta_decay 0.0 is not positive']),
    ('beta_decay', ['--beta_decay', -1], ['--beta_decay -1.0 is not positive']),
    ('seed', ['--seed', -1], ['--seed -1 is outside [0, 2**32)', 'leave --seed out']),
    ('seed', ['--seed', 2 ** 32], ['--seed 4294967296 is outside [0, 2**32)']),
    ('data_seed', ['--data_seed', -1], ['--data_seed -1 is outside [0, 2**32)']),
    ('cohort', ['--cohort', 'not json'], ['--cohort is not valid JSON']),
    ('cohort', ['--cohort', '[{"name": "a", "alpha": 2}]'], ["--cohort member 'a': --alpha 2 is outside [0, 1]"]),
    ('cohort', ['--cohort', '[{"name": "a", "seed": 1.5}]'], ["--cohort member 'a': --seed 1.5 is not a whole number"]),
    ('ngpu', ['--ngpu', 0], ['--ngpu 0 is below 1']),
    ('gpu_id', ['--gpu_id', 'x'], ["--gpu_id 'x' is not a comma-separated list of GPU ids"]),
    ('gpu_id', ['--gpu_id', '0;1'], ["--gpu_id '0;1'"]),
    ('gpu_id', ['--gpu_id', '0,'], ["--gpu_id '0,'"]),
    ('teacher_id', ['--teacher_id', '../x'], ["--teacher_id '../x' is not a run name under logs/"]),
    ('teacher_id', ['--teacher_id', '/abs/run'], ["--teacher_id '/abs/run' is not a run name"]),
    ('teacher_id', ['--teacher_id', '.'], ["--teacher_id '.' is not a run name"]),
    ('teacher_id', ['--teacher_id', 'a/../..'], ["--teacher_id 'a/../..' is not a run name"]),
    # What the options name on disk
    ('save', ['--save', ''], ['--save is required']),
    ('save', ['--save', 'afile'], ['--save afile is a file', 'name a directory']),
    ('save', ['--save', 'afile/run'], ['--save afile/run lies inside', 'afile, which is a file']),
    ('resume', ['--resume', 'logs/nolog'], ['--resume logs/nolog/model.pt7 does not exist']),  # a folder: its model.pt7
    ('resume', ['--resume', 'missing.pt7'], ['--resume missing.pt7 does not exist']),
    ('dataroot', ['--dataroot', 'afile'], ['--dataroot afile is a file']),
    ('dataroot', ['--dataroot', 'afile/cifar'], ['--dataroot afile/cifar lies inside', 'which is a file']),
    ('teacher_id', ['--teacher_id', 'nope'], ['teacher logs/nope does not exist', '--teacher_id']),
    ('teacher_id', ['--teacher_id', 'nolog'], ['logs/nolog/log.txt does not exist']),
    ('teacher_id', ['--teacher_id', 'nockpt'], ['teacher logs/nockpt has no model.pt7']),
    # Combinations
    ('grad_beta', ['--grad_beta', 1], ['--grad_beta compares the student with a teacher',
                                       'give --teacher_id or --teacher_params']),
    ('compile', ['--sym_beta', 1, '--compile', 'on'], ['torch.compile']),
    ('ngpu', ['--grad_beta', 1, '--teacher_id', 'teacher', '--ngpu', 2],
     ['--grad_beta and --sym_beta cannot split batches over GPUs with --ngpu', 'use torchrun']),
    ('precision', ['--reference', '--precision', 'bf16'], ['--reference trains in fp32', 'drop --precision bf16']),
    ('precision', ['--dtype', 'double', '--precision', 'fp32'],
     ['--dtype double keeps every tensor in double; drop --precision fp32']),
    # Image trees
    ('dataroot', ['--dataroot', 'renamed'],
     ['renamed/train and renamed/test have different class folders', 'only in train: class3;',
      'only in test: class3x']),
    ('dataroot', ['--dataroot', 'empty_class'], ['class folder empty_class/train/class3 holds no images']),
    ('dataroot', ['--dataroot', 'stray_only'], ['class folder stray_only/train/class5 holds no images']),
    ('dataroot', ['--dataroot', 'extra_test'], ['only in train: none; only in test: class10']),
    ('dataset', ['--dataset', 'CIFAR100'], ['data/train has 10 class folders but --dataset CIFAR100 has 100']),
]

IMAGENET_CASES = [
    ('student_params', ['--student_params', 'missing.pth'], ['student weights missing.pth do not exist',
                                                             'torchvision resnet18/34 state dict']),
    ('depth', ['--depth', 50], ['--depth 50 is not an ImageNet ResNet here; use 18 or 34']),
    ('depth', ['--depth', 16], ['--depth 16 is not an ImageNet ResNet']),
    ('width', ['--width', 0], ['--width 0.0 gives no channels']),
    ('width', ['--width', 0.01], ['--width 0.01 gives no channels']),
    ('width', ['--width', 'nan'], ['--width nan is not a finite number']),
    ('nthread', ['--nthread', -1], ['--nthread -1 is negative']),
    ('batch_size', ['--batch_size', 0], ['--batch_size 0 is below 1']),
    ('epochs', ['--epochs', -3], ['--epochs -3 is below 1']),
    ('lr', ['--lr', -1], ['--lr -1.0 is not positive']),
    ('weight_decay', ['--weight_decay', 'nan'], ['--weight_decay nan is not a finite number']),
    ('epoch_step', ['--epoch_step', '[30,30]'], ["--epoch_step '[30,30]'", 'strictly increasing']),
    ('lr_decay_ratio', ['--lr_decay_ratio', 0], ['--lr_decay_ratio 0.0 is not positive']),
    ('temperature', ['--temperature', 0], ['--temperature 0.0 is not positive']),
    ('alpha', ['--alpha', 2], ['--alpha 2.0 is outside [0, 1]']),
    ('beta', ['--beta', -1], ['--beta -1.0 is negative']),
    ('grad_beta', ['--grad_beta', -1], ['--grad_beta -1.0 is negative']),
    ('sym_beta', ['--sym_beta', 'nan'], ['--sym_beta nan is not a finite number']),
    ('fitnet_beta', ['--fitnet_beta', -1], ['--fitnet_beta -1.0 is negative']),
    ('cos_beta', ['--cos_beta', -1], ['--cos_beta -1.0 is negative']),
    ('aux_weight', ['--aux_weight', 'inf'], ['--aux_weight inf is not a finite number']),
    ('at_p', ['--at_p', 0], ['--at_p 0.0 is not positive']),
    ('beta_decay', ['--beta_decay', 0], ['--beta_decay 0.0 is not positive']),
    ('seed', ['--seed', 2 ** 32], ['--seed 4294967296 is outside [0, 2**32)']),
    ('data_seed', ['--data_seed', 2 ** 32], ['--data_seed 4294967296 is outside [0, 2**32)']),
    ('cohort', ['--cohort', '[{"name": "a", "temperature": 0}]'],
     ["--cohort member 'a': --temperature 0 is not positive"]),
    ('ngpu', ['--ngpu', 0], ['--ngpu 0 is below 1']),
    ('gpu_id', ['--gpu_id', 'gpu0'], ["--gpu_id 'gpu0' is not a comma-separated list"]),
    ('precision', ['--reference', '--precision', 'bf16'], ['--reference trains in fp32', 'drop --reference']),
    ('imagenetpath', ['--imagenetpath', ''], ['--imagenetpath is required']),
    ('imagenetpath', ['--imagenetpath', 'afile'], ['--imagenetpath afile is a file']),
    ('imagenetpath', ['--imagenetpath', 'nowhere'], ['nowhere/train does not exist']),
    ('teacher_params', ['--teacher_params', 'missing.pth'], ['teacher weights missing.pth do not exist']),
    ('teacher_params', ['--teacher_params', 'weights_dir'], ['teacher weights weights_dir is a directory']),
    ('save', ['--save', 'afile'], ['--save afile is a file']),
    ('resume', ['--resume', 'logs/nolog'], ['--resume logs/nolog/model.pt7 does not exist']),
    ('factt_beta', ['--factt_beta', 1], ['--factt_beta compares the student with a teacher',
                                         'give --teacher_params']),
    ('imagenetpath', ['--imagenetpath', 'inet_renamed'],
     ['inet_renamed/train and inet_renamed/val have different class folders', 'only in train: n2',
      'only in val: n2x']),
    ('imagenetpath', ['--imagenetpath', 'inet_empty'], ['class folder inet_empty/train/n1 holds no images']),
    ('ngpu', ['--sym_beta', 1, '--teacher_params', 'weights.pth', '--ngpu', 2],
     ['--grad_beta and --sym_beta cannot split batches over GPUs with --ngpu']),
]

CASES = [('cifar.py', *c) for c in CIFAR_CASES] + [('imagenet.py', *c) for c in IMAGENET_CASES]


@pytest.mark.parametrize('script, flag, extra, phrases', CASES,
                         ids=[f'{s}:{" ".join(map(str, e))}' for s, _, e, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_anything_is_loaded(script, flag, extra, phrases, tripwires, capsys):
    main, base = SCRIPTS[script]
    before = fingerprint(tripwires)
    with pytest.raises(SystemExit) as stop:
        main([*map(str, base), *map(str, extra)])
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert fingerprint(tripwires) == before


# The choices argparse enforces on the command line, and values of the wrong type, matter for
# options that arrive as JSON: check_option refuses them itself.
DIRECT_CASES = [
    (RULES, 'momentum_at_decay', 'reset', "--momentum_at_decay 'reset' is not one of the choices"),
    (RULES, 'alpha', True, '--alpha True is not a number'),
    (RULES, 'alpha', '0.9', "--alpha '0.9' is not a number"),
    (RULES, 'beta', None, '--beta None is not a number'),
    (RULES, 'temperature', float('-inf'), '--temperature -inf is not a finite number'),
    (RULES, 'seed', 1.5, '--seed 1.5 is not a whole number'),
    (RULES, 'seed', False, '--seed False is not a whole number'),
    (RULES, 'at_form', 'Paper', "--at_form 'Paper' is not one of the choices; use one of code, paper"),
    (RULES, 'fitnet_regressor', 'ConvReg',
     "--fitnet_regressor 'ConvReg' is not one of the choices; use one of conv, convreg"),
    (RULES, 'compile', 'yes', "--compile 'yes' is not one of the choices"),
    (RULES, 'compile_mode', 'max', "--compile_mode 'max' is not one of the choices"),
    (RULES, 'precision', 'fp16', "--precision 'fp16' is not one of the choices; use one of auto, bf16, fp32"),
    (RULES, 'dtype', 'float16', "--dtype 'float16' is not one of the choices"),
    (RULES, 'cuda', 1, '--cuda 1 is not true or false'),
    (RULES, 'reference', 'yes', "--reference 'yes' is not true or false"),
    (RULES, 'deterministic', None, '--deterministic None is not true or false'),
    (RULES, 'save', 3, '--save 3 is not text'),
    (RULES, 'tensorboard', 'yes', "--tensorboard 'yes' is not one of the choices; use one of auto, on, off"),
    (RULES, 'tensorboard_every', 0, '--tensorboard_every 0 is below 1; write the training loss every N >= 1 steps'),
    (CIFAR_RULES, 'dataset', 'CIFAR1000', "--dataset 'CIFAR1000' is not one of the choices"),
    (CIFAR_RULES, 'randomcrop_pad', 31.5, '--randomcrop_pad 31.5 is not a whole number in [0, 32)'),
    (IMAGENET_RULES, 'teacher_params', 0, '--teacher_params 0 is not text'),
    (RULES, 'alpah', 0.5, "'alpah' is not an option here"),
    # the CRD benchmark's other methods and DKD
    *[(RULES, flag, -1, f'--{flag} -1 is negative; a loss weight is 0 (off) or positive')
      for flag in ('sp_beta', 'cc_beta', 'rkd_beta', 'pkt_beta', 'nst_beta', 'kdsvd_beta', 'fsp_beta', 'vid_beta',
                   'dkd_beta')],
    (RULES, 'cc_dim', 0, '--cc_dim 0 is below 1'), (RULES, 'cc_dim', 64.0, '--cc_dim 64.0 is not a whole number'),
    (RULES, 'rkd_w_d', -25, '--rkd_w_d -25 is negative'), (RULES, 'rkd_w_a', '50', "--rkd_w_a '50' is not a number"),
    (RULES, 'kdsvd_k', 0, '--kdsvd_k 0 is below 1'), (RULES, 'dkd_alpha', -1, '--dkd_alpha -1 is negative'),
    (RULES, 'dkd_nckd', float('nan'), '--dkd_nckd nan is not a finite number'),
    (RULES, 'dkd_warmup', -1, '--dkd_warmup -1 is negative'), (RULES, 'dkd_warmup', 2.5, 'is not a whole number'),
    (RULES, 'logit_stand', 1, '--logit_stand 1 is not true or false'),
    # CRD and KD as a term of its own
    *[(RULES, flag, -1, f'--{flag} -1 is negative') for flag in ('kd_beta', 'crd_beta')],
    (RULES, 'crd_feat_dim', 0, '--crd_feat_dim 0 is below 1'), (RULES, 'crd_nce_k', 0, '--crd_nce_k 0 is below 1'),
    (RULES, 'crd_nce_t', 0, '--crd_nce_t 0 is not positive'),
    (RULES, 'crd_nce_m', 1, '--crd_nce_m 1 is outside [0, 1)'),
    # ReviewKD and OFD
    *[(RULES, flag, -1, f'--{flag} -1 is negative') for flag in ('reviewkd_beta', 'ofd_beta')],
    (RULES, 'reviewkd_warmup', -1, '--reviewkd_warmup -1 is negative'),
    (RULES, 'reviewkd_warmup', 2.5, '--reviewkd_warmup 2.5 is not a whole number'),
    (RULES, 'reviewkd_mid_channels', 0, '--reviewkd_mid_channels 0 is below 1'),
    (RULES, 'ofd_teacher', 'training', "--ofd_teacher 'training' is not one of the choices; use one of eval, train"),
    (RULES, 'ce_weight', -0.1, '--ce_weight -0.1 is negative'),
    # AB, FT and the init stage
    *[(RULES, flag, -1, f'--{flag} -1 is negative') for flag in ('ab_beta', 'ft_beta')],
    (RULES, 'ft_rate', 0, '--ft_rate 0 is outside (0, 1]'), (RULES, 'ft_rate', 1.5, '--ft_rate 1.5 is outside (0, 1]'),
    (RULES, 'init_epochs', -1, '--init_epochs -1 is negative'),
    (RULES, 'init_epochs', 2.5, '--init_epochs 2.5 is not a whole number'),
    (RULES, 'init_lr', 0, '--init_lr 0 is not positive'),
    (RULES, 'init_lr', '0.01', "--init_lr '0.01' is not a number"),
    (CIFAR_RULES, 'train_per_class', -1, '--train_per_class -1 is negative'),
    (CIFAR_RULES, 'test_per_class', 2.5, '--test_per_class 2.5 is not a whole number'),
    (RULES, 'param_table', 1, '--param_table 1 is not true or false'),
    # every method's flags, those of methods added later too: a value of the wrong kind, a negative weight
    *[(RULES, f.name, {bool: 1, int: 2.5, str: 0}.get(f.type, 'x'), f'--{f.name}') for f in methods.flags()],
    *[(RULES, f.name, -1, f'--{f.name} -1 is') for f in methods.flags() if f.weight],
]


@pytest.mark.parametrize('rules, flag, value, message', DIRECT_CASES)
def test_check_option_refuses_wrong_types_and_choices(rules, flag, value, message):
    with pytest.raises(UserError) as e:
        check_option(flag, value, rules)
    assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('rules, flag, value', [
    (RULES, 'alpha', 0), (RULES, 'alpha', 1), (RULES, 'alpha', 0.9), (CIFAR_RULES, 'randomcrop_pad', 0),
    (CIFAR_RULES, 'randomcrop_pad', 4.0), (CIFAR_RULES, 'randomcrop_pad', 31), (RULES, 'lr_decay_ratio', 1),
    (RULES, 'lr_decay_ratio', 2.0), (RULES, 'temperature', 0.5), (RULES, 'beta', 0), (RULES, 'beta', 1e3),
    (RULES, 'at_p', 1), (RULES, 'beta_decay', 1), (RULES, 'weight_decay', 0), (RULES, 'nthread', 0),
    (RULES, 'seed', None), (RULES, 'seed', 0), (RULES, 'seed', 2 ** 32 - 1), (RULES, 'epoch_step', '[]'),
    (RULES, 'epoch_step', '[1]'), (RULES, 'epoch_step', ' [60, 120, 160] '), (RULES, 'at_form', 'paper'),
    (RULES, 'gpu_id', ''), (RULES, 'gpu_id', '0,1'), (RULES, 'gpu_id', '-1'),
    (RULES, 'gpu_id', 'GPU-8932f937-d72c-4106-c12f-20bd9faed9f6'), (RULES, 'cuda', True),
    (CIFAR_RULES, 'width', 0.0625), (CIFAR_RULES, 'depth', 10), (CIFAR_RULES, 'teacher_id', ''),
    (CIFAR_RULES, 'teacher_id', 'table1/teacher_wrn16-2'), (IMAGENET_RULES, 'depth', 34),
    (CIFAR_RULES, 'arch', 'wrn'), (CIFAR_RULES, 'arch', 'ShuffleV2'), (CIFAR_RULES, 'teacher_arch', ''),
    (CIFAR_RULES, 'teacher_arch', 'ResNet50'), (CIFAR_RULES, 'crop_padding', 'zero'),
    (CIFAR_RULES, 'normalization', 'cifar100'),
    (IMAGENET_RULES, 'width', 1 / 64), (RULES, 'dkd_warmup', 0), (RULES, 'kdsvd_k', 1), (RULES, 'cc_dim', 1),
    (RULES, 'rkd_w_a', 0), (RULES, 'logit_stand', True), (RULES, 'reviewkd_warmup', 0),
    (RULES, 'reviewkd_mid_channels', 1), (RULES, 'ft_rate', 1), (RULES, 'init_epochs', None),
    (RULES, 'init_epochs', 0), (RULES, 'init_lr', None), (RULES, 'init_lr', 1e-4)])
def test_valid_edge_values_are_accepted(rules, flag, value):
    assert check_option(flag, value, rules) == value


def test_precision_goes_with_the_fast_path_and_at_cpu_bf16_is_checked_first(tripwires, monkeypatch, capsys):
    for combination in (['--reference', '--precision', 'fp32'], ['--precision', 'bf16'], ['--dtype', 'double']):
        with pytest.raises(Reached):
            cifar.main([*map(str, SCRIPTS['cifar.py'][1]), *combination])
    monkeypatch.setenv('AT_CPU_BF16', 'true')
    before = fingerprint(tripwires)
    with pytest.raises(SystemExit) as stop:
        imagenet.main([*map(str, SCRIPTS['imagenet.py'][1]), '--precision', 'fp32'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "AT_CPU_BF16='true' is neither 0 nor 1" in lines[0], lines
    assert fingerprint(tripwires) == before


def test_valid_edge_values_pass_every_check_of_the_command_line(tripwires):
    edges = ['--randomcrop_pad', 0, '--lr_decay_ratio', 1, '--epoch_step', '[]', '--seed', 0,
             '--teacher_id', 'teacher', '--beta', 0]
    for alpha in (0, 1):
        with pytest.raises(Reached):
            cifar.main([*map(str, SCRIPTS['cifar.py'][1]), *map(str, edges), '--alpha', str(alpha)])
    (tripwires / 'published.pth').write_bytes(b'')  # the checks look, they do not read
    with pytest.raises(Reached):  # a published teacher serves the methods that need one
        cifar.main([*map(str, SCRIPTS['cifar.py'][1]), '--arch', 'ShuffleV1', '--teacher_params', 'published.pth',
                    '--teacher_arch', 'resnet32x4', '--grad_beta', '1', '--crop_padding', 'zero',
                    '--normalization', 'cifar100'])
    with pytest.raises(Reached):
        imagenet.main([*map(str, SCRIPTS['imagenet.py'][1]), '--seed', str(2 ** 32 - 1), '--gpu_id', '0,1'])


@pytest.mark.parametrize('parse_args, rules, cases, required', [
    (cifar.parse_args, CIFAR_RULES, CIFAR_CASES, []),
    (imagenet.parse_args, IMAGENET_RULES, IMAGENET_CASES, ['--imagenetpath', 'x'])])
def test_every_flag_has_a_rule_and_a_refused_value(parse_args, rules, cases, required):
    opt = parse_args(['--save', 'x', *required])  # the defaults pass their own rules
    assert set(vars(opt)) == set(rules), set(vars(opt)) ^ set(rules)
    refused = {flag for flag, _, _ in cases} | {flag for _, flag, _, _ in DIRECT_CASES if flag in rules}
    assert set(rules) - refused == set(), set(rules) - refused
    # the options a per-student JSON may set follow the rules both scripts share
    assert {'alpha', 'beta', 'temperature', 'beta_decay', 'at_p', 'at_form', 'factt_beta', 'fitnet_beta',
            'cos_beta', 'aux_weight', 'seed'} <= set(RULES)


@pytest.mark.parametrize('script, args, phrase', [
    ('cifar.py', ['--alpha', 2], '--alpha 2.0 is outside [0, 1]'),
    ('cifar.py', ['--dataroot', 'renamed'], 'only in test: class3x'),
    ('imagenet.py', ['--lr', -1], '--lr -1.0 is not positive'),
])
def test_the_command_line_reports_one_line(script, args, phrase, workdir):
    before = fingerprint(workdir)
    result = run_cli(script, *SCRIPTS[script][1], *args, cwd=workdir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{script}: error: ') and phrase in lines[0], result.stderr
    assert fingerprint(workdir) == before


# ----------------------------------------------------------------------------------------------
# What an image tree may hold

def test_images_of_any_8_bit_mode_load_as_rgb_and_stray_files_are_skipped(tmp_path):
    root = make_image_tree(str(tmp_path), n_train=10, n_test=10)
    folder = tmp_path / 'test/class0'
    Image.new('L', (32, 32), 77).save(folder / 'gray.png')
    Image.new('RGBA', (32, 32), (10, 20, 30, 0)).save(folder / 'rgba.png')
    palette = Image.new('P', (32, 32), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.save(folder / 'palette.png')
    (folder / 'notes.txt').write_text('not an image')
    (folder / '.DS_Store').write_bytes(b'\0\1')
    images, labels = load_cifar(root, 'CIFAR10', False)
    assert images.shape == (13, 3, 32, 32) and labels.tolist()[:4] == [0] * 4
    # class0 holds 0000.png, gray.png, palette.png, rgba.png, in that order
    assert (images[1] == 77).all()
    assert images[2, :, 5, 5].tolist() == [200, 100, 50]
    assert images[3, :, 5, 5].tolist() == [10, 20, 30]  # alpha dropped, not blended


def test_16_bit_images_are_refused_rather_than_clipped(tmp_path):
    root = make_image_tree(str(tmp_path), n_train=10, n_test=10)
    Image.fromarray(np.full((32, 32), 300, np.uint16)).save(tmp_path / 'test/class1/wide.png')
    with pytest.raises(UserError, match='wide.png has I;16 samples'):
        load_cifar(root, 'CIFAR10', False)


@pytest.mark.parametrize('extra, phrases', [
    (['--ngpu', 2, '--compile', 'on'], ['--compile on is not supported with --ngpu > 1', 'use --compile auto or off']),
    (['--cohort', '[{"name": "a"}]', '--compile_mode', 'reduce-overhead'],
     ['--compile_mode reduce-overhead records CUDA graphs for one run', 'use --compile_mode default with --cohort']),
], ids=['ngpu-compile', 'cohort-reduce-overhead'])
def test_combinations_refused_as_the_runs_start_are_one_line_too(extra, phrases, workdir, monkeypatch, capsys):
    """These are refused by start_runs (devices and cohorts), which the table's tripwire replaces."""
    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(cifar, 'load_teacher', reached)  # the first step after start_runs
    before = fingerprint(workdir)
    with pytest.raises(SystemExit) as stop:
        cifar.main([*map(str, SCRIPTS['cifar.py'][1]), *map(str, extra)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and 'Traceback' not in err, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert fingerprint(workdir) == before
    with pytest.raises(Reached):  # the second flag alone passes: it is the combination that is refused
        cifar.main([*map(str, SCRIPTS['cifar.py'][1]), *map(str, extra[2:])])

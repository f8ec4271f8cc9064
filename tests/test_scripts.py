"""The experiment scripts: every run they would start is a valid cifar.py command line."""
import os
import shlex
import shutil
import subprocess

import pytest

import cifar
import methods
from conftest import ROOT
from engine.cohort import member_runs


def planned_runs(script, *args, root=ROOT, **env):
    # the scripts ask `python3 -m methods` for their columns: from a copy elsewhere, it is found on PYTHONPATH
    out = subprocess.run(['bash', os.path.join(root, 'scripts', script), *args], capture_output=True,
                         text=True, check=True, env={**os.environ, 'CIFAR': 'echo', 'PYTHONPATH': ROOT, **env})
    commands = [shlex.split(line) for line in out.stdout.splitlines()]
    # commands a person can copy: the script's command, then its flags, JSON in plain single quotes
    assert all(c[:2] == ['python3', 'cifar.py'] for c in commands) and '\\' not in out.stdout, out.stdout[:500]
    return [c[2:] for c in commands]


def test_table1_plans_every_cell_over_five_seeds_after_its_teacher():
    runs = [cifar.parse_args(flags) for flags in planned_runs('table1.sh', '--dataroot', 'data')]
    assert len(runs) == 3 + 3 and len({r.save for r in runs}) == len(runs)
    assert all(r.dataroot == 'data' and r.save.startswith('logs/table1/') for r in runs)
    trained, cells = set(), {}
    for r in runs:
        if not r.teacher_id:
            trained.add(r.save[len('logs/'):])
            continue
        assert r.teacher_id in trained  # each teacher is trained before its students
        for m in member_runs(r, cifar.CIFAR_RULES, 'teacher_id'):  # one cohort per row
            method = ('at' if m.beta else '') + ('kd' if m.alpha else '') + ('factt' if m.factt_beta else '')
            cells.setdefault((m.depth, m.width, m.teacher_id, method or 'alone'), []).append(m.seed)
            assert m.save == os.path.join(r.save, f'{method_name(m)}_seed{m.seed}')
    pairs = {(16, 1, 'table1/teacher_wrn16-2'), (16, 1, 'table1/teacher_wrn40-1'), (16, 2, 'table1/teacher_wrn40-2')}
    assert {(d, w, t) for d, w, t, _ in cells} == pairs
    for d, w, t in pairs:
        for method in ('alone', 'at', 'kd', 'atkd', 'factt'):
            assert sorted(cells[(d, w, t, method)]) == [1, 2, 3, 4, 5], (d, w, t, method)
    at_kd = next(m for r in runs if r.cohort for m in member_runs(r, cifar.CIFAR_RULES, 'teacher_id')
                 if m.alpha and m.beta)
    assert at_kd.beta_decay < 1 and at_kd.alpha == 0.9 and at_kd.beta == 1e3


def method_name(m):
    return {(0, 0, 0): 'student', (1, 0, 0): 'at', (0, 1, 0): 'kd', (1, 1, 0): 'at_kd', (0, 0, 1): 'factt'}[
        (bool(m.beta), bool(m.alpha), bool(m.factt_beta))]


def test_table1_resumes_runs_that_have_started(tmp_path):
    """Started again after an interruption, the script continues the teachers and rows it finds."""
    os.makedirs(tmp_path / 'scripts')
    for script in ('table1.sh', 'runs.sh'):
        shutil.copy(os.path.join(ROOT, 'scripts', script), tmp_path / 'scripts')
    assert not any('--resume' in r for r in planned_runs('table1.sh', root=tmp_path, SEEDS='1'))
    os.makedirs(tmp_path / 'logs/table1/teacher_wrn40-1')
    (tmp_path / 'logs/table1/teacher_wrn40-1/model.pt7').write_bytes(b'')
    os.makedirs(tmp_path / 'logs/table1/wrn16-2_from_wrn40-2/at_seed1')
    runs = planned_runs('table1.sh', root=tmp_path, SEEDS='1')
    assert len(runs) == 3 + 3
    resumed = [r[:4] for r in runs if '--resume' in r]
    assert resumed == [['--save', 'logs/table1/teacher_wrn40-1', '--resume', 'logs/table1/teacher_wrn40-1/model.pt7'],
                       ['--save', 'logs/table1/wrn16-2_from_wrn40-2', '--resume', 'logs/table1/wrn16-2_from_wrn40-2']]
    assert len(member_runs(cifar.parse_args(runs[-1]), cifar.CIFAR_RULES, 'teacher_id')) == 5


# ----------------------------------------------------------------------------------------------
# crd_table.sh: the CRD paper's CIFAR-100 benchmark

CRD_PAIRS = {('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('resnet56', 'resnet20'), ('resnet110', 'resnet20'),
             ('resnet110', 'resnet32'), ('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'),
             ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'), ('resnet32x4', 'ShuffleV1'),
             ('resnet32x4', 'ShuffleV2'), ('wrn_40_2', 'ShuffleV1')}
# Each column's loss weights (RepDistiller's -b; DKD and KDSVD as mdistiller weighs them); a
# weight left out is 0.
CRD_COLUMNS = {'student': {}, 'kd': {'alpha': 0.9}, 'at': {'beta': 1e3}, 'at_kd': {'alpha': 0.9, 'beta': 1e3},
               'sp': {'sp_beta': 3000}, 'cc': {'cc_beta': 0.02}, 'rkd': {'rkd_beta': 1}, 'pkt': {'pkt_beta': 3e4},
               'nst': {'nst_beta': 50}, 'vid': {'vid_beta': 1}, 'dkd': {'dkd_beta': 1},
               'fsp': {'fsp_beta': 1}, 'kdsvd': {'kdsvd_beta': 1}, 'fitnet': {'fitnet_beta': 100},
               'ab': {'ab_beta': 1}, 'ft': {'ft_beta': 200}, 'crd': {'crd_beta': 0.8},
               'crd_kd': {'crd_beta': 0.8, 'kd_beta': 1}, 'ofd': {'ofd_beta': 1e-3}, 'reviewkd': {'reviewkd_beta': 1},
               'kd_ls': {'kd_beta': 9}}  # with --ce_weight 0.1, T 2: its authors' recipe
CRD_WEIGHTS = ('alpha', 'beta', 'sp_beta', 'cc_beta', 'rkd_beta', 'pkt_beta', 'nst_beta', 'vid_beta', 'dkd_beta',
               'fsp_beta', 'kdsvd_beta', 'fitnet_beta', 'ab_beta', 'ft_beta', 'crd_beta', 'kd_beta', 'ofd_beta',
               'reviewkd_beta')
INIT_COLUMNS = ('ab', 'ft', 'fsp')  # RepDistiller's 30 init epochs
# DKD's beta in mdistiller's configs/cifar100/dkd/ (8, its default, for the pairs it has no file for).
DKD_NCKD = {('resnet56', 'resnet20'): 2, ('resnet110', 'resnet32'): 2, ('wrn_40_2', 'wrn_16_2'): 6,
            ('wrn_40_2', 'wrn_40_1'): 6, ('vgg13', 'vgg8'): 6, ('vgg13', 'MobileNetV2'): 6}


def group_shapes(arch):
    import torch

    from models import zoo
    f, params = zoo.network(arch, 100)
    with torch.no_grad():
        return [g.shape[1:] for g in f(torch.zeros(1, 3, 32, 32), params, False)[1]]


@pytest.fixture(scope='module')
def equal_widths():
    """{column: the pairs it runs on}: FSP and KDSVD compare the groups' channels one to one, OFD
    every group's positions."""
    shapes = {arch: group_shapes(arch) for pair in CRD_PAIRS for arch in pair}
    widths = {(t, s) for t, s in CRD_PAIRS if [g[0] for g in shapes[t]] == [g[0] for g in shapes[s]]}
    sizes = {(t, s) for t, s in CRD_PAIRS if [g[1:] for g in shapes[t]] == [g[1:] for g in shapes[s]]}
    return {'fsp': widths, 'kdsvd': widths, 'ofd': sizes}


def check_crd_protocol(r, arch, temperature=4):
    """RepDistiller's training settings, on every run of the benchmark."""
    assert (r.dataset, r.epochs, r.batch_size, r.epoch_step, r.lr_decay_ratio, r.weight_decay) == \
        ('CIFAR100', 240, 64, '[150,180,210]', 0.1, 5e-4)
    assert (r.randomcrop_pad, r.crop_padding, r.normalization, r.temperature) == (4, 'zero', 'cifar100', temperature)
    assert r.arch == arch and r.lr == (0.01 if arch in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2') else 0.05)


def crd_rows(runs, seeds, equal_widths):
    """{(teacher, student): the row's run} after checking each row's members."""
    rows = {}
    for r in runs:
        teacher = r.teacher_arch or r.teacher_id[len('crd/teacher_'):]
        rows[(teacher, r.arch)] = r
        assert r.save == f'logs/crd/{r.arch}_from_{teacher}'
        check_crd_protocol(r, r.arch)
        members = member_runs(r, cifar.CIFAR_RULES, cifar.TEACHER_FLAGS)
        # the row is the registry's, every method's columns; those of the CRD paper's table and
        # mdistiller's, checked here one by one, are among them where the pair allows them
        assert sorted((m.save, m.seed) for m in members) == sorted(
            (f'{r.save}/{m["name"]}', m['seed']) for m in methods.cohort('crd', teacher, r.arch, seeds))
        columns = [c for c in CRD_COLUMNS if c not in equal_widths or (teacher, r.arch) in equal_widths[c]]
        assert set(columns) <= {os.path.basename(m.save).rsplit('_seed', 1)[0] for m in members}
        assert not set(CRD_COLUMNS) - set(columns) & {os.path.basename(m.save).rsplit('_seed', 1)[0] for m in members}
        for m in members:
            column = os.path.basename(m.save).rsplit('_seed', 1)[0]
            if column not in CRD_COLUMNS:
                continue  # a later method's column: its own tests check its settings
            expected = dict(CRD_COLUMNS[column])
            if column == 'reviewkd' and (teacher, r.arch) == ('resnet32x4', 'resnet8x4'):
                expected['reviewkd_beta'] = 5  # mdistiller's one CIFAR-100 file
            assert {k: getattr(m, k) for k in CRD_WEIGHTS if getattr(m, k)} == expected, m.save
            check_crd_protocol(m, r.arch, 2 if column == 'kd_ls' else 4)
            assert m.dkd_nckd == (DKD_NCKD.get((teacher, r.arch), 8) if column == 'dkd' else 8), m.save
            assert m.init_epochs == (30 if column in INIT_COLUMNS else 0), m.save
            assert m.fitnet_regressor == ('convreg' if column == 'fitnet' else 'conv'), m.save
            ft_lr = 0.01 if r.arch.startswith(('resnet', 'wrn')) else r.lr
            assert m.init_lr == (ft_lr if column == 'ft' else r.lr if column in INIT_COLUMNS else None), m.save
            same = (m.dkd_alpha, m.dkd_warmup, m.rkd_w_d, m.rkd_w_a, m.kdsvd_k, m.cc_dim, m.logit_stand, m.ce_weight)
            assert same == (1, 20, 25, 50, 1, 128, column == 'kd_ls', 0.1 if column == 'kd_ls' else 1), m.save
    assert set(rows) == CRD_PAIRS and len(runs) == len(CRD_PAIRS)
    return rows


def test_crd_table_trains_the_teachers_first_without_published_ones(equal_widths):
    runs = [cifar.parse_args(flags) for flags in planned_runs('crd_table.sh', '--dataroot', 'data')]
    assert all(r.dataroot == 'data' for r in runs)
    teachers = [r for r in runs if not r.cohort]
    assert {r.arch for r in teachers} == {t for t, _ in CRD_PAIRS} and len(teachers) == 6
    for r in teachers:
        assert r.save == f'logs/crd/teacher_{r.arch}' and r.seed == 1 and not (r.alpha or r.beta)
        check_crd_protocol(r, r.arch)
    assert runs[:6] == teachers  # every teacher before any student
    rows = crd_rows(runs[6:], seeds=[1], equal_widths=equal_widths)
    assert all(r.teacher_id == f'crd/teacher_{t}' and not r.teacher_params for (t, _), r in rows.items())


def test_crd_table_reads_published_teachers_in_repdistillers_layout(equal_widths):
    runs = [cifar.parse_args(flags) for flags in planned_runs('crd_table.sh', TEACHERS='/models', SEEDS='1 2 3')]
    rows = crd_rows(runs, seeds=[1, 2, 3], equal_widths=equal_widths)
    for (t, _), r in rows.items():
        assert (r.teacher_params, r.teacher_arch, r.teacher_id) == (f'/models/{t}_vanilla/ckpt_epoch_240.pth', t, '')


def test_crd_table_resumes_and_refuses_a_missing_published_teacher(tmp_path):
    os.makedirs(tmp_path / 'scripts')
    for script in ('crd_table.sh', 'runs.sh'):
        shutil.copy(os.path.join(ROOT, 'scripts', script), tmp_path / 'scripts')
    os.makedirs(tmp_path / 'logs/crd/teacher_vgg13')
    (tmp_path / 'logs/crd/teacher_vgg13/model.pt7').write_bytes(b'')
    os.makedirs(tmp_path / 'logs/crd/vgg8_from_vgg13/at_seed1')
    runs = planned_runs('crd_table.sh', root=tmp_path)
    assert len(runs) == 6 + 13
    assert [r[:4] for r in runs if '--resume' in r] == [
        ['--save', 'logs/crd/teacher_vgg13', '--resume', 'logs/crd/teacher_vgg13/model.pt7'],
        ['--save', 'logs/crd/vgg8_from_vgg13', '--resume', 'logs/crd/vgg8_from_vgg13']]
    out = subprocess.run(['bash', str(tmp_path / 'scripts/crd_table.sh')], capture_output=True, text=True,
                         env={**os.environ, 'CIFAR': 'false', 'TEACHERS': str(tmp_path / 'none'), 'PYTHONPATH': ROOT})
    assert out.returncode == 2 and out.stdout == ''
    assert out.stderr.strip() == (f'crd_table.sh: {tmp_path}/none/wrn_40_2_vanilla/ckpt_epoch_240.pth does not exist; '
                                  f'fetch RepDistiller\'s teachers into TEACHERS={tmp_path}/none or leave TEACHERS '
                                  f'unset to train them here')

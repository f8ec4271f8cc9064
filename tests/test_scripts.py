"""The experiment scripts: every run they would start is a valid cifar.py command line."""
import os
import shlex
import shutil
import subprocess

import cifar
from cohort import member_runs
from conftest import ROOT


def planned_runs(script, *args, root=ROOT, **env):
    out = subprocess.run(['bash', os.path.join(root, 'scripts', script), *args], capture_output=True,
                         text=True, check=True, env={**os.environ, 'CIFAR': 'echo', **env})
    return [shlex.split(line) for line in out.stdout.splitlines()]


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
    shutil.copy(os.path.join(ROOT, 'scripts', 'table1.sh'), tmp_path / 'scripts')
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

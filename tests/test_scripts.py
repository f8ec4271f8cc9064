"""The experiment scripts: every run they would start is a valid cifar.py command line."""
import os
import shlex
import shutil
import subprocess

import cifar
from conftest import ROOT


def planned_runs(script, *args, root=ROOT, **env):
    out = subprocess.run(['bash', os.path.join(root, 'scripts', script), *args], capture_output=True,
                         text=True, check=True, env={**os.environ, 'CIFAR': 'echo', **env})
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_table1_plans_every_cell_over_five_seeds_after_its_teacher():
    runs = [cifar.parse_args(flags) for flags in planned_runs('table1.sh', '--dataroot', 'data')]
    assert len(runs) == 3 + 5 * (2 + 3 * 4) and len({r.save for r in runs}) == len(runs)
    assert all(r.dataroot == 'data' and r.save.startswith('logs/table1/') for r in runs)
    trained = set()
    cells = {}
    for r in runs:
        if r.teacher_id:
            assert r.teacher_id in trained  # each teacher is trained before its students
            method = ('at' if r.beta else '') + ('kd' if r.alpha else '') + ('factt' if r.factt_beta else '')
            cells.setdefault((r.depth, r.width, r.teacher_id, method), []).append(r.seed)
        else:
            trained.add(r.save[len('logs/'):])
            cells.setdefault((r.depth, r.width, '', 'alone'), []).append(r.seed)
    pairs = {(16, 1, 'table1/teacher_wrn16-2'), (16, 1, 'table1/teacher_wrn40-1'), (16, 2, 'table1/teacher_wrn40-2')}
    for d, w, t in pairs:
        for method in ('at', 'kd', 'atkd', 'factt'):
            assert sorted(cells[(d, w, t, method)]) == [1, 2, 3, 4, 5], (d, w, t, method)
    assert sorted(cells[(16, 1, '', 'alone')]) == [1, 2, 3, 4, 5]
    at_kd = next(r for r in runs if r.alpha and r.beta)
    assert at_kd.beta_decay < 1 and at_kd.alpha == 0.9 and at_kd.beta == 1e3


def test_table1_resumes_runs_that_have_a_checkpoint(tmp_path):
    """Started again after an interruption, the script continues the runs it finds."""
    os.makedirs(tmp_path / 'scripts')
    shutil.copy(os.path.join(ROOT, 'scripts', 'table1.sh'), tmp_path / 'scripts')
    assert not any('--resume' in r for r in planned_runs('table1.sh', root=tmp_path, SEEDS='1'))
    os.makedirs(tmp_path / 'logs/table1/teacher_wrn40-1')
    (tmp_path / 'logs/table1/teacher_wrn40-1/model.pt7').write_bytes(b'')
    runs = planned_runs('table1.sh', root=tmp_path, SEEDS='1')
    assert len(runs) == 3 + 14
    resumed = [r for r in runs if '--resume' in r]
    assert resumed == [['--save', 'logs/table1/teacher_wrn40-1', '--resume',
                        'logs/table1/teacher_wrn40-1/model.pt7', '--depth', '40', '--width', '1', '--seed', '1']]

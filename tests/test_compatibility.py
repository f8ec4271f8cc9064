"""Runs made by earlier code go on as that code would have gone on: a cohort stopped in the middle
of an epoch (tests/fixtures/cohort_resume, made by its make_fixture.py) resumes to the log lines
and the weights that the code which stopped it wrote when it resumed it, bit for bit."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import methods
from conftest import ROOT, make_image_tree

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'cohort_resume')
# Options added since the fixture was made, at the values that do what the code did before them:
# the only keys a resumed line may have beyond the fixture's, besides the flags of methods added
# since (at their defaults, which switch them off).
ADDED = {'train_per_class': 0, 'test_per_class': 0, 'param_table': False, 'student_params': '', 'init': 'auto',
         'augment': 'on', 'momentum_at_decay': 'restart'}


def added(line, want):
    """The options of `line` that `want`, a fixture's line, lacks, and those they should be."""
    extra = {k: v for k, v in line.items() if k not in want and k not in make_fixture.TIMES}
    new_flags = {f.name: f.default for f in methods.flags() if f.name in extra}
    return extra, {**new_flags, **{k: v for k, v in ADDED.items() if k in extra}}
sys.path.insert(0, FIXTURE)
import make_fixture  # noqa: E402


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
    """The fixture's cohort resumed by today's code in the fixture's pinned environment."""
    workdir = tmp_path_factory.mktemp('cohort_resume')
    shutil.copytree(os.path.join(FIXTURE, 'logs'), workdir / 'logs')
    make_image_tree(str(workdir / 'data'), n_train=make_fixture.N_TRAIN, n_test=make_fixture.N_TEST)
    env = dict(os.environ, PYTHONPATH=ROOT, **make_fixture.PINNED)
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'cifar.py'), *make_fixture.RESUME], cwd=workdir,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


@pytest.mark.parametrize('member', [m['name'] for m in make_fixture.MEMBERS])
def test_a_stopped_cohort_resumes_to_the_same_log_lines_and_bits(resumed, member):
    run_dir = resumed / 'logs' / 'cohort' / member
    with open(run_dir / 'log.txt') as f:
        lines = [json.loads(line[len('json_stats: '):]) for line in f]
    with open(os.path.join(FIXTURE, 'expected', f'{member}.jsonl')) as f:
        expected = [json.loads(line) for line in f]
    assert len(lines) == len(expected)
    for line, want in zip(lines, expected):
        extra, allowed = added(line, want)
        assert extra == allowed
        # json.loads keeps the key order, so the dumps compare keys, their order and every value
        assert json.dumps({k: v for k, v in line.items() if k in want}) == json.dumps(want)
    params = torch.load(run_dir / 'model.pt7', map_location='cpu', weights_only=True)['params']
    params = {k: v for k, v in params.items() if not k.startswith('teacher.')}
    want = torch.load(os.path.join(FIXTURE, 'expected', f'{member}.pt'), map_location='cpu', weights_only=True)
    assert sorted(params) == sorted(want)
    for k, v in want.items():
        assert torch.equal(params[k], v), (k, (params[k] - v).abs().max().item())

"""DIST (methods/dist.py): its loss against torchdistill's DISTLoss and against its formula
written out sample by sample and class by class, in float64; and the method through cifar.py, in
a cohort, in summarize.py's table and as a column of scripts/crd_table.sh."""
import json
import math

import pytest
import torch
from torchdistill.losses import mid_level

import methods
import summarize
from conftest import run_cli
from methods.dist import dist_loss
from test_cifar import TINY, log_lines, ok


def logits(seed, shape=(6, 10)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize('inter, intra, tau', [(1, 1, 1), (2, 2, 4), (0.5, 3, 2)])
def test_dist_is_torchdistills_dist_loss(inter, intra, tau):
    y_s, y_t = logits(0), logits(1) * 3
    reference = mid_level.DISTLoss('m', 'output', 'm', 'output', beta=inter, gamma=intra, tau=tau)
    expected = reference({'m': {'output': y_s}}, {'m': {'output': y_t}})
    torch.testing.assert_close(dist_loss(y_s, y_t, inter, intra, tau), expected, rtol=1e-12, atol=0)


def test_dist_is_its_formula_written_out():
    """tau^2 (beta (1 - mean_i rho(p_s,i, p_t,i)) + gamma (1 - mean_c rho(p_s,:c, p_t,:c))), with
    rho the Pearson correlation of two vectors, each sum written out."""
    y_s, y_t, tau = logits(2, (5, 7)), logits(3, (5, 7)), 3.0
    p_s, p_t = torch.softmax(y_s / tau, 1).tolist(), torch.softmax(y_t / tau, 1).tolist()

    def rho(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    inter = 1 - sum(rho(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    columns = list(range(len(p_s[0])))
    intra = 1 - sum(rho([r[c] for r in p_s], [r[c] for r in p_t]) for c in columns) / len(columns)
    expected = tau ** 2 * (2 * inter + 0.5 * intra)
    assert abs(dist_loss(y_s, y_t, 2, 0.5, tau).item() - expected) < 1e-12 * expected
    assert dist_loss(y_t, y_t, 1, 1, tau).abs() < 1e-12  # a student that predicts as its teacher


def test_dist_in_a_cohort_through_the_cli_and_in_the_table(image_tree, tmp_path):
    """A cohort member with DIST beside one without: its term logged with its weight, the learned
    nothing else; summarize.py names its settings; crd_table.sh's rows have a DIST column."""
    ok(run_cli('cifar.py', *TINY, '--width', 1, '--epochs', 1, '--seed', 1, '--dataroot', image_tree,
               '--save', 'logs/teacher', cwd=tmp_path))
    members = [{'name': 'plain', 'seed': 2}, {'name': 'dist', 'seed': 2, 'dist_beta': 1, 'dist_tau': 4}]
    ok(run_cli('cifar.py', *TINY, '--width', 0.5, '--epochs', 2, '--dataroot', image_tree, '--teacher_id', 'teacher',
               '--save', 'logs/row', '--cohort', json.dumps(members), cwd=tmp_path))
    lines = log_lines(tmp_path / 'logs/row/dist')
    for r in lines:
        mean, std = r['dist_loss']
        assert math.isfinite(mean) and mean > 0 and std > 0
        assert r['loss_weights'] == {'distillation': 1, 'at': 0, 'dist': 1}
        assert (r['dist_inter'], r['dist_intra'], r['dist_tau']) == (1, 1, 4)
    assert 'dist_loss' not in log_lines(tmp_path / 'logs/row/plain')[0]
    groups = summarize.group_runs([summarize.describe_run(str(tmp_path / f'logs/row/{n}'),
                                                          summarize.read_records(str(tmp_path / f'logs/row/{n}')))
                                   for n in ('plain', 'dist')])
    assert sorted(summarize.method_weights(g[0]['options']) for g in groups) == ['-', 'dist_beta 1, dist_tau 4']
    row = methods.cohort('crd', 'resnet32x4', 'resnet8x4', [1])
    assert {'name': 'dist_seed1', 'seed': 1, 'dist_beta': 1} in row

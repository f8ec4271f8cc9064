"""Deep mutual learning (methods/dml.py): its term against the paper's formula written out, a
cohort's steps against the paper's two-network update written out by hand, what is refused, and a
DML cohort beside a teacher, resumed, bit for bit where an uninterrupted one ends."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cifar
from conftest import make_image_tree, run_in_process
from engine.cohort import member_runs
from engine.errors import UserError
from engine.members import build_members
from engine.training import make_steps
from methods.dml import dml_loss
from resnet import resnet
from test_cifar import checkpoint, log_lines, ok
from test_training import cpu_speed


def logits(seed, shape=(5, 7), scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_dml_is_the_mean_kl_from_each_peer_written_out():
    """T^2 * mean_k (1/B) sum_i sum_c q_k,ic log(q_k,ic / p_ic), p and q softmaxes at T, each sum
    written out; the peers' logits are targets: no gradient reaches them."""
    z, peers, T = logits(0), [logits(1, scale=2), logits(2)], 3.0
    p = torch.softmax(z / T, 1).tolist()
    expected = 0.0
    for z_k in peers:
        q = torch.softmax(z_k / T, 1).tolist()
        expected += sum(q[i][c] * math.log(q[i][c] / p[i][c]) for i in range(len(p)) for c in range(len(p[0]))) / len(p)
    expected *= T ** 2 / len(peers)
    assert abs(dml_loss(z, peers, T).item() - expected) < 1e-12 * expected
    assert dml_loss(z, [z.clone()], 1.0).abs() < 1e-14 and dml_loss(z, [], 1.0) == 0
    z_k = logits(3).requires_grad_()
    z_own = z.clone().requires_grad_()
    dml_loss(z_own, [z_k]).backward()
    assert z_k.grad is None and z_own.grad.abs().sum() > 0


def sgd_(params, grads, buffers, lr=0.1, momentum=0.9, weight_decay=5e-4):
    """SGD as the paper's networks (and the suite) train: momentum, weight decay, no dampening."""
    for k, g in grads.items():
        d = g.add(params[k], alpha=weight_decay)
        buffers[k] = d.clone() if k not in buffers else buffers[k].mul(momentum).add(d)
        params[k] = params[k].detach().add(buffers[k], alpha=-lr).requires_grad_()


def network_loss(z, y, peer_logits):
    """The paper's loss of one network of logits z: its cross-entropy plus KL(p_peer || p_self),
    T = 1, the peer's prediction held fixed; the KL summed over classes, averaged over the batch."""
    q = torch.softmax(peer_logits.detach(), 1)
    kl = (q * (q.log() - torch.log_softmax(z, 1))).sum() / len(y)
    return F.cross_entropy(z, y) + kl


def step_by_hand(nets, buffers, x, y, sequential):
    """One step of two networks: simultaneous (both learn from the other's prediction of before
    this step's updates) or the paper's Algorithm 1 (network 2 learns from network 1's prediction
    recomputed after network 1's update)."""
    f = resnet(10, 0.25, 10)[0]
    z = [f(x, p, True)[0] for p in nets]
    for i, p in enumerate(nets):
        peer = z[1 - i]
        if sequential and i == 1:
            with torch.no_grad():
                peer = f(x, nets[0], True)[0]
        trained = {k: v for k, v in p.items() if v.requires_grad}
        grads = torch.autograd.grad(network_loss(z[i], y, peer), list(trained.values()))
        sgd_(p, dict(zip(trained, grads)), buffers[i])


def test_a_cohort_step_is_the_papers_two_network_update_written_out():
    """Two WRN-10-0.25 peers of a cohort without a teacher (weight 1, T = 1: the paper's), beside a
    member without DML, two SGD steps in float64: each peer's parameters and batch-norm
    statistics are, bit for bit, those of the two-network update written out by hand, each
    network's loss its cross-entropy plus KL(p_peer || p_self) with the peer's prediction of the
    step held fixed, both networks stepping from the predictions of before the step. The member
    without DML is nobody's peer. The paper's sequential Algorithm 1 ends elsewhere."""
    members = [{'name': 'a', 'seed': 1, 'dml_beta': 1}, {'name': 'plain', 'seed': 3},
               {'name': 'b', 'seed': 2, 'dml_beta': 1}]
    opt = cifar.parse_args(['--save', 'unused', '--depth', '10', '--width', '0.25', '--dtype', 'double', '--cohort',
                            json.dumps(members)])
    cohort = build_members(member_runs(opt, cifar.CIFAR_RULES, 'teacher_id'), lambda: resnet(10, 0.25, 10), None,
                           image_size=32, device=torch.device('cpu'), channels_last=False)
    for m in cohort:
        m.start(False, 10, 1, torch.device('cpu'))
        m.weights.update(m.objective.weights(1, []))
    train_step, _ = make_steps(cohort, cpu_speed(channels_last=False, fused=False))
    a, _, b = cohort
    assert [list(m.weights.items()) for m in (a, b)] == [[('cross_entropy', 1), ('dml', 1)]] * 2

    def copy(m):
        return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in m.params.items()}
    simultaneous, sequential = [copy(a), copy(b)], [copy(a), copy(b)]
    buffers = {'simultaneous': [{}, {}], 'sequential': [{}, {}]}
    g = torch.Generator().manual_seed(0)
    for i in range(1, 3):
        x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
        outputs = train_step(SimpleNamespace(state=SimpleNamespace(iteration=i)), (x, y, 1.0, torch.arange(4)))
        assert set(outputs[a]['terms']) == {'cross_entropy', 'dml'} and 'dml' not in outputs[cohort[1]]['terms']
        step_by_hand(simultaneous, buffers['simultaneous'], x, y, sequential=False)
        step_by_hand(sequential, buffers['sequential'], x, y, sequential=True)
    for m, by_hand in zip((a, b), simultaneous):
        for k, v in m.params.items():
            assert torch.equal(v, by_hand[k]), (m.name, k)
    gap = max(((sequential[1][k] - v).abs().max() / v.abs().max()).item() for k, v in b.params.items()
              if v.requires_grad)
    assert gap > 1e-6  # the test tells the two updates apart


@pytest.mark.parametrize('flags, phrases', [
    (['--dml_beta', 1], ['--dml_beta 1 learns from the other members of a cohort', 'a single run has none']),
    (['--cohort', '[{"name": "a", "dml_beta": 1}, {"name": "b"}]'],
     ["--cohort member 'a'", 'no other member does', 'give dml_beta to a second member']),
    (['--cohort', '[{"name": "a", "dml_beta": 0.5}]'], ["--cohort member 'a'", 'no other member does']),
    (['--cohort', '[{"name": "a", "dml_beta": 1}, {"name": "b", "dml_beta": 1, "dml_temperature": 0}]'],
     ['--dml_temperature 0', 'is not positive']),
    (['--cohort', '[{"name": "a", "dml_beta": -1}, {"name": "b", "dml_beta": 1}]'], ['--dml_beta -1']),
])
def test_bad_dml_options_are_refused_in_one_line(flags, phrases):
    with pytest.raises(UserError) as e:
        cifar.parse_args(['--save', 'unused', *map(str, flags)])
    message = str(e.value)
    assert '\n' not in message and all(p in message for p in phrases), message


def test_dml_needs_no_teacher_and_combines_with_one():
    members = [{'name': 'a', 'dml_beta': 1}, {'name': 'b', 'dml_beta': 2, 'dml_temperature': 4}]
    assert cifar.parse_args(['--save', 'unused', '--cohort', json.dumps(members)])
    members[0].update(alpha=0.9, beta=1e3)
    assert cifar.parse_args(['--save', 'unused', '--teacher_id', 't', '--cohort', json.dumps(members)])


def test_a_dml_cohort_beside_a_teacher_resumes_bit_for_bit(tmp_path):
    """KD+DML and DML at T 2, peers of one teacher's cohort: stopped after one epoch and resumed,
    each ends bit for bit where the uninterrupted cohort ends; each logs its DML term and weight."""
    make_image_tree(str(tmp_path / 'data'), n_train=32, n_test=16)
    run = ['--depth', 10, '--width', 0.5, '--batch_size', 16, '--nthread', 1, '--dataroot', 'data', '--precision',
           'fp32', '--deterministic']
    ok(run_in_process(cifar.main, *run, '--epochs', 1, '--seed', 1, '--save', 'logs/teacher', cwd=tmp_path))
    members = [{'name': 'kd_dml', 'seed': 2, 'alpha': 0.9, 'dml_beta': 1},
               {'name': 'dml', 'seed': 3, 'dml_beta': 0.5, 'dml_temperature': 2}]
    common = [*run, '--teacher_id', 'teacher', '--cohort', json.dumps(members)]
    ok(run_in_process(cifar.main, *common, '--epochs', 2, '--save', 'logs/straight', cwd=tmp_path))
    ok(run_in_process(cifar.main, *common, '--epochs', 1, '--save', 'logs/split', cwd=tmp_path))
    ok(run_in_process(cifar.main, *common, '--epochs', 2, '--save', 'logs/split', '--resume', 'logs/split',
                      cwd=tmp_path))
    for name in ('kd_dml', 'dml'):
        straight, split = tmp_path / 'logs/straight' / name, tmp_path / 'logs/split' / name
        a, b = checkpoint(straight)['params'], checkpoint(split)['params']
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert [(r['train_loss'], r['dml_loss']) for r in log_lines(split)] == \
            [(r['train_loss'], r['dml_loss']) for r in log_lines(straight)], name
    lines = {name: log_lines(tmp_path / 'logs/straight' / name) for name in ('kd_dml', 'dml')}
    assert [r['loss_weights'] for r in lines['kd_dml']] == [{'distillation': 1, 'at': 0, 'dml': 1}] * 2
    assert lines['dml'][0]['loss_weights'] == {'distillation': 1, 'at': 0, 'dml': 0.5}
    assert all(r['dml_loss'][0] > 0 for name in ('kd_dml', 'dml') for r in lines[name])

"""The registry of transfer methods (methods/__init__.py): every method declares what the engine
needs, its declarations agree with what it computes, and nothing outside methods/ names one."""
import argparse
import json
import os
import re

import pytest
import torch

import methods
from conftest import ROOT
from engine.members import join_networks
from engine.rules import check_option
from methods.base import Peer
from resnet import resnet

METHODS = methods.all_methods()


def options(**given):
    """Every method's flags at their defaults, a run's other options as cifar.py's defaults."""
    import cifar
    return argparse.Namespace(**{**vars(cifar.parse_args(['--save', 'unused'])), **given})


def test_every_method_is_found_once_in_its_fixed_order():
    names = [m.name for m in METHODS]
    assert len(set(names)) == len(names) and len({m.order for m in METHODS}) == len(METHODS)
    assert [m.order for m in METHODS] == sorted(m.order for m in METHODS)
    assert {'kd', 'at', 'crd', 'ab', 'ft', 'reviewkd', 'ofd', 'dkd', 'vid'} <= set(names)
    flags = [f.name for f in methods.flags()]
    assert len(set(flags)) == len(flags)
    # the flags of the methods that had them before the registry keep their places: log lines keep their key order
    assert flags[:len(methods.FLAG_ORDER)] == list(methods.FLAG_ORDER)


@pytest.mark.parametrize('flag', methods.flags(), ids=lambda f: f.name)
def test_every_flag_has_a_rule_that_accepts_its_default(flag):
    value = 0.5 if flag.weight and flag.name != 'alpha' else flag.default
    if value is not None:
        assert check_option(flag.name, value, methods.rules()) == value
    assert flag.neutral is methods.base.KEPT or flag.neutral == flag.default or flag.name == 'init_epochs'


def wrn_pair():
    torch.manual_seed(0)
    f_s, p_s = resnet(10, 0.5, 10)
    f_t, p_t = resnet(10, 0.5, 10)  # equal widths and sizes: every method can compare them

    def teacher(x, p, prefix, **asked):
        return f_t(x, p, False, prefix, **asked)
    teacher.bn_before_relu = f_t.bn_before_relu
    return f_s, {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in p_s.items()}, \
        (teacher, {k: v.detach().double() for k, v in p_t.items()})


def method_options(m):
    """The options of a run with `m` at its example's settings (or weight 1), alone."""
    example = next(iter(m.examples.values()), {m.weight: 1})
    return options(**methods.for_training_set(example, 40), init_epochs=2 if m.init_stage else 0, seed=3)


def test_no_flag_takes_the_name_of_a_log_field():
    """A run's log line holds its options and its terms' meters (`<term>_loss`, `<term>_losses`) side
    by side: a flag named like a meter would be overwritten by it, or overwrite it."""
    assert not [f.name for f in methods.flags() if f.name.endswith(('_loss', '_losses'))]


@pytest.mark.parametrize('m', METHODS, ids=lambda m: m.name)
def test_each_method_computes_the_terms_it_declares_and_trains_its_parts(m):
    """In every stage it has, a method's terms are the ones it names, in that order, finite, and
    their weighted sum reaches the student and its own trainable parts, never the teacher or its
    buffers."""
    opt = method_options(m)
    objective, params = join_networks(opt, *wrn_pair(), train_labels=torch.arange(40) % 10)
    params = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in params.items()}
    assert m in objective.methods
    parts = [k for k in params if k.startswith('aux.')]
    for k in parts:
        assert params[k].requires_grad == (not k.endswith(('running_mean', 'running_var'))
                                           and k.rsplit('.', 1)[-1] not in m.buffers), k
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    stages = ['init'] * bool(m.init_stage) + ['main'] * bool(m.term_names(opt, objective, 'main'))
    if not stages:  # a method of how the run steps, not of what it learns from (DOT): its own optimizer
        assert m.optimizer(opt, [v for v in params.values() if v.requires_grad]) is not None
        return
    for stage in stages:
        objective.step = 1
        strong = {'strong': (x.flip(3), None)} if 'strong_view' in m.reads else {}  # the teacher's computed there
        logits, terms = objective(x, y, params, True, index=torch.arange(4), stage=stage, **strong)
        if objective.peer_methods and stage == 'main':  # beside a peer of the same options
            terms = objective.with_peer_terms(terms, y, logits, [Peer(opt, torch.randn_like(logits))])
        assert list(terms) == objective.term_names(stage=stage), stage
        names = m.term_names(opt, objective, stage)
        assert names and set(names) <= set(terms), stage
        assert all(torch.isfinite(v) for v in terms.values()), stage
        weights = objective.weights(1, [], stage=stage)
        assert set(weights) == {n.rstrip('0123456789') for n in terms}, stage
        loss = sum(weights[n.rstrip('0123456789')] * v for n, v in terms.items())
        trained = [k for k in params if params[k].requires_grad]
        grads = torch.autograd.grad(loss, [params[k] for k in trained], allow_unused=True)
        reached = {k for k, g in zip(trained, grads) if g is not None and g.abs().sum() > 0}
        assert not any(k.startswith('teacher.') for k in trained)
        if stage == 'main' or m.init_stage == 'trains':
            assert any(k.startswith('student.') for k in reached), stage
        own = {k for k in parts if params[k].requires_grad}
        if m.init_stage == 'parts':  # some of its parts train in the init stage, the others in the main one
            assert own & reached, stage
        else:
            assert own <= reached, (stage, own - reached)
    if not m.training_only and 'main' in stages:
        _, terms = objective(x, y, params, False)
        assert list(terms) == objective.term_names(training=False)


@pytest.mark.parametrize('table', methods.TABLES)
def test_every_column_is_a_valid_cohort_member(table):
    import cifar
    from engine.cohort import member_runs
    pairs = {'table1': [('wrn_16_2', 'wrn_16_1')], 'crd': [('resnet32x4', 'resnet8x4'), ('vgg13', 'MobileNetV2')]}
    for teacher, student in pairs[table]:
        members = methods.cohort(table, teacher, student, [1, 2])
        flags = ['--save', 'unused', '--teacher_params', 'x', '--teacher_arch', teacher, '--arch', student,
                 '--dataset', 'CIFAR100']
        if table == 'table1':
            flags = ['--save', 'unused', '--teacher_id', 't', '--depth', '16', '--width', '1']
        opt = cifar.parse_args([*flags, '--cohort', json.dumps(members)])
        runs = member_runs(opt, cifar.CIFAR_RULES, cifar.TEACHER_FLAGS)
        assert len(runs) == len(members) and members[0]['name'] == 'student_seed1'


# The flags of the methods by name, as no file outside methods/ may spell them: the engine, the
# scripts and the benchmarks learn about methods through the registry. The paper's own AT and KD
# are the exception: visualize.py draws AT's maps with a run's --at_p, and the original code's
# utils.py and pipeline (benchmarks/epoch_speed.py) are AT and KD.
NAMED = {f.name for m in METHODS if m.name not in ('at', 'kd') for f in m.flags}


def test_no_file_outside_methods_names_a_method_flag():
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in ('.git', 'methods', 'tests', 'docs', 'results', 'logs', '__pycache__')
                   and not d.startswith('.')]
        for name in files:
            if name.endswith(('.py', '.sh')):
                path = os.path.join(folder, name)
                text = open(path).read()
                found += [(os.path.relpath(path, ROOT), flag) for flag in NAMED
                          if re.search(rf'\b{flag}\b', text)]
    assert found == []

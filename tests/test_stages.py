"""Init stages (AB, FT, FSP; RepDistiller's --init_epochs) through cifar.py: what each stage
trains, its log lines and checkpoints, cohorts whose members have init stages of different
lengths, resuming inside either stage, and the options that are refused."""
import json
import os
import signal

import pytest
import torch

import cifar
import summarize
from conftest import make_image_tree, run_cli, run_in_process
from datasets.cifar import Loader
from engine import training
from engine.cohort import seed_generators
from methods import ft, parts
from resnet import resnet
from test_cifar import checkpoint, expect_user_error, log_lines, ok
from utils import flatten

# two steps of 16 images an epoch, in float64 on the reference path
RUN = ['--depth', 10, '--width', 0.5, '--batch_size', 16, '--nthread', 2, '--epoch_step', '[2]',
       '--dtype', 'double', '--reference', '--tensorboard', 'off']


@pytest.fixture(scope='module')
def small_tree(tmp_path_factory):
    return make_image_tree(str(tmp_path_factory.mktemp('stage_tree')), n_train=32, n_test=16)


@pytest.fixture(scope='module')
def workdir(small_tree, tmp_path_factory):
    """Teachers in logs/: 'wide' a WRN-10-1 (AB and FT connect other widths), 'half' a WRN-10-0.5
    (FSP compares equal widths), one epoch each."""
    d = tmp_path_factory.mktemp('stages')
    for name, width in (('wide', 1), ('half', 0.5)):
        flags = [*RUN, '--width', width, '--epochs', 1, '--seed', 1, '--dataroot', small_tree, '--save', f'logs/{name}']
        ok(run_in_process(cifar.main, *flags, cwd=d))
    return d


def fresh_student(seed):
    """The student a run with `seed` starts from (members.build_members seeds, then builds it)."""
    seed_generators(seed)
    return {k: v.double() for k, v in resnet(10, 0.5, 10)[1].items()}


def stages_of(run_dir):
    return [(r.get('stage'), r['epoch']) for r in log_lines(run_dir)]


def test_each_method_trains_what_its_init_stage_trains(small_tree, workdir):
    """AB trains the student's body and its connectors (not the classifier, which gets no
    gradient), FSP the student alone, FT only its paraphraser; then the main stage trains the
    student, FT's translator beside it, and leaves the paraphraser as the init stage left it."""
    common = [*RUN, '--dataroot', small_tree, '--seed', 5, '--init_epochs', 2]
    for name, flags in (('ab', ['--ab_beta', 2, '--teacher_id', 'wide']),
                        ('fsp', ['--fsp_beta', 1, '--teacher_id', 'half']),
                        ('ft', ['--ft_beta', 200, '--teacher_id', 'wide'])):
        # --epochs 0 is refused, so the init stage alone is a run stopped after its last init epoch
        stopped = run_in_process(stop_after_epoch(2, cifar.main), *common, *flags, '--epochs', 2,
                                 '--save', f'logs/{name}', cwd=workdir)
        assert stopped.returncode == 128 + signal.SIGTERM and 'after init epoch 2' in stopped.stderr, stopped.stderr
        after_init = checkpoint(workdir / 'logs' / name)
        assert {k: after_init[k] for k in ('epoch', 'init_epochs', 'init_epochs_done', 'iteration')} == \
            {'epoch': 0, 'init_epochs': 2, 'init_epochs_done': 2, 'iteration': 4}
        fresh, p = fresh_student(5), after_init['params']
        changed = {k for k, v in fresh.items() if not torch.equal(p['student.' + k], v)}
        aux = {k for k in p if k.startswith('aux.')}
        if name == 'ft':
            assert not changed and aux and all(k.startswith(('aux.ft.paraphraser', 'aux.ft.translator')) for k in aux)
        else:
            assert {'fc.weight', 'fc.bias'} & changed == set()
            assert {'conv0', 'group0.block0.conv0', 'group2.block0.bn0.weight'} <= changed
        assert bool(aux) == (name != 'fsp') and all(k.startswith(f'aux.{name}') for k in aux)
        lines = log_lines(workdir / 'logs' / name)
        assert [(r['stage'], r['epoch']) for r in lines] == [('init', 1), ('init', 2)]
        term = {'ab': 'ab_loss', 'fsp': 'fsp_loss', 'ft': 'reconstruction_loss'}[name]
        weight = 2.0 if name == 'ab' else 1.0  # FT's reconstruction: RepDistiller's plain MSE
        assert lines[0][term][0] > 0 and lines[0]['loss_weights'] == {term[:-len('_loss')]: weight}
        assert lines[0]['train_loss'] == pytest.approx(weight * lines[0][term][0], rel=1e-12)
        assert (lines[0]['train_acc'] is None) == (name == 'ft')
        assert 0 <= lines[0]['test_acc'] <= 100 and lines[0]['init_epochs'] == 2 and lines[0]['init_lr'] == 0.1

        resume = [*common, *flags, '--epochs', 2, '--save', f'logs/{name}', '--resume', f'logs/{name}/model.pt7']
        ok(run_in_process(cifar.main, *resume, cwd=workdir))
        done = ok(run_in_process(cifar.main, *resume, cwd=workdir)).stdout
        assert 'has already trained 2 of 2 epochs after its 2 init epochs; nothing to do' in done
        assert stages_of(workdir / 'logs' / name) == [('init', 1), ('init', 2), ('main', 1), ('main', 2)]
        main_line = log_lines(workdir / 'logs' / name)[-1]
        assert term not in main_line and ('ft_loss' in main_line) == (name == 'ft')
        assert 'ab' not in main_line['loss_weights'] and 'fsp' not in main_line['loss_weights']
        final = checkpoint(workdir / 'logs' / name)
        assert final['epoch'] == 2 and final['iteration'] == 8 and final['init_epochs_done'] == 2
        for k, v in final['params'].items():
            if k.startswith('aux.ft.paraphraser') or k.startswith(f'aux.{name}') and name == 'ab':
                assert torch.equal(v, p[k]), (name, k)  # fixed, or unused, in the main stage
            if k.startswith(('student.fc', 'aux.ft.translator.conv')):
                assert not torch.equal(v, p[k]), (name, k)


def stop_after_epoch(epoch, main):
    """`main` with a SIGTERM arriving at the end of the timeline's `epoch` (mid-epoch: `step`)."""
    return stop_at(main, epoch=epoch)


class FakeSignal:
    """training.SignalStop, with the signal arriving after a chosen epoch or step."""

    def __init__(self, epoch=None, step=None):
        self.epoch, self.step, self.epochs, self.signum = epoch, step, 0, None

    def __call__(self, standing):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def requested(self, step=None):
        if step is None:
            self.epochs += 1
        if (step is None and self.epochs == self.epoch) or (step is not None and step == self.step):
            self.signum = signal.SIGTERM
        return self.signum is not None

    def name(self):
        return 'SIGTERM'


def stop_at(main, epoch=None, step=None):
    def run(argv):
        real = training.SignalStop
        training.SignalStop = FakeSignal(epoch, step)
        try:
            main(argv)
        finally:
            training.SignalStop = real
    return run


@pytest.mark.parametrize('method', [['--fsp_beta', 1, '--teacher_id', 'half'],
                                    ['--ft_beta', 200, '--teacher_id', 'wide']])
def test_a_run_resumes_bit_for_bit_inside_either_stage(small_tree, workdir, method):
    """Stopped in the middle of an init epoch, then in the middle of a main epoch, and resumed
    each time, an FSP run (the student trains in both stages) and an FT run (its paraphraser,
    then its translator) end bit for bit where the uninterrupted run ends, log included."""
    name = method[0][2:4]
    common = [*RUN, '--dataroot', small_tree, '--seed', 6, *method, '--init_epochs', 2, '--init_lr', 0.05,
              '--epochs', 2]
    ok(run_in_process(cifar.main, *common, '--save', f'logs/{name}_straight', cwd=workdir))
    stopped = run_in_process(stop_at(cifar.main, step=3), *common, '--save', f'logs/{name}_split', cwd=workdir)
    assert stopped.returncode == 128 + signal.SIGTERM and 'at init epoch 2, step 1' in stopped.stderr, stopped.stderr
    state = checkpoint(workdir / f'logs/{name}_split')
    assert (state['iteration'], state['epoch'], state['init_epochs_done'], state['lr']) == (3, 0, 1, 0.05)
    resume = ['--save', f'logs/{name}_split', '--resume', f'logs/{name}_split/model.pt7']
    stopped = run_in_process(stop_at(cifar.main, step=7), *common, *resume, cwd=workdir)
    assert stopped.returncode == 128 + signal.SIGTERM and 'at epoch 2, step 1' in stopped.stderr, stopped.stderr
    state = checkpoint(workdir / f'logs/{name}_split')
    # the init stage's learning rate is --init_lr, constant; the main stage's follows --lr (0.1, 0.02 from epoch 2)
    assert (state['iteration'], state['epoch'], state['init_epochs_done'], state['lr']) == (7, 1, 2, 0.1 * 0.2)
    ok(run_in_process(cifar.main, *common, *resume, cwd=workdir))
    a, b = checkpoint(workdir / f'logs/{name}_straight'), checkpoint(workdir / f'logs/{name}_split')
    assert a['params'].keys() == b['params'].keys()
    for k in a['params']:
        assert torch.equal(a['params'][k], b['params'][k]), k
    lines, split = log_lines(workdir / f'logs/{name}_straight'), log_lines(workdir / f'logs/{name}_split')
    assert [(r['stage'], r['epoch']) for r in split] == [('init', 1), ('init', 2), ('main', 1), ('main', 2)]
    assert [r['loss_weights'] for r in lines] == [r['loss_weights'] for r in split]
    for line, other in zip(lines, split):
        assert (line['test_loss'], line['test_acc']) == (other['test_loss'], other['test_acc'])
    # the epochs that were not cut in two measured the same steps
    assert [lines[i]['train_loss'] for i in (0, 2)] == [split[i]['train_loss'] for i in (0, 2)]
    if name == 'fs':
        assert 'fsp_loss' in lines[0] and 'fsp_loss' not in lines[2]  # with an init stage, FSP trains only there
    assert [r['init_lr'] for r in lines] == [0.05] * 4
    # a resume with another init stage than the checkpoint's is refused before anything is written
    before = sorted(os.listdir(workdir / f'logs/{name}_split'))
    expect_user_error(run_in_process(cifar.main, *common[:-4], '--init_epochs', 3, '--epochs', 3, *resume,
                                     cwd=workdir), '--init_epochs 3 differs from the 2', 'drop --init_epochs')
    assert sorted(os.listdir(workdir / f'logs/{name}_split')) == before


def test_cohort_members_with_and_without_init_stages_equal_their_single_runs(small_tree, workdir):
    """A cohort runs the longest init stage (AB's 2 epochs); FT's single init epoch comes after
    one idle epoch and the plain student idles through both, so every main stage falls on the
    same batches and the teacher's forward stays shared; each member ends where its single run
    (its options, the cohort's --data_seed) ends, in float64."""
    members = [{'name': 'ab', 'seed': 31, 'ab_beta': 1, 'init_epochs': 2, 'alpha': 0.9},
               {'name': 'ft', 'seed': 32, 'ft_beta': 200, 'init_epochs': 1, 'init_lr': 0.01},
               {'name': 'plain', 'seed': 33, 'beta': 1e3}]
    common = [*RUN, '--dataroot', small_tree, '--teacher_id', 'wide', '--epochs', 2]
    out = ok(run_cli('cifar.py', *common, '--save', 'logs/row', '--cohort', json.dumps(members), cwd=workdir))
    assert out.stdout.count(', test_acc') == 2 + 1 + 2 * 3
    for member in members:
        name = member['name']
        flags = [f for k, v in member.items() if k != 'name' for f in (f'--{k}', v)]
        ok(run_in_process(cifar.main, *common, *flags, '--data_seed', 31, '--save', f'logs/single/{name}',
                          cwd=workdir))
        a, b = checkpoint(workdir / 'logs/row' / name), checkpoint(workdir / 'logs/single' / name)
        assert a['params'].keys() == b['params'].keys()
        for k in a['params']:
            torch.testing.assert_close(a['params'][k], b['params'][k], rtol=1e-9, atol=1e-12, msg=f'{name}: {k}')
        assert {k: a[k] for k in ('epoch', 'iteration')} == {k: b[k] for k in ('epoch', 'iteration')}
        assert a.get('init_epochs') == b.get('init_epochs') == member.get('init_epochs')
        lines, single = log_lines(workdir / 'logs/row' / name), log_lines(workdir / 'logs/single' / name)
        assert [(r.get('stage'), r['epoch']) for r in lines] == [(r.get('stage'), r['epoch']) for r in single]
        for line, expected in zip(lines, single):
            torch.testing.assert_close(torch.tensor(line['train_loss'], dtype=torch.float64),
                                       torch.tensor(expected['train_loss'], dtype=torch.float64), rtol=1e-6, atol=0)
    # a run without init stage keeps its lines as they were: no 'stage', epochs from 1
    assert stages_of(workdir / 'logs/row/plain') == [(None, 1), (None, 2)]
    assert stages_of(workdir / 'logs/row/ft') == [('init', 1), ('main', 1), ('main', 2)]


def test_summarize_reads_the_main_stage_and_names_the_init_stage(small_tree, workdir, capsys):
    common = [*RUN, '--dataroot', small_tree, '--teacher_id', 'half', '--epochs', 1, '--fsp_beta', 1]
    for name, flags in (('with_init', ['--init_epochs', 1]), ('main_term', ['--init_epochs', 0])):
        ok(run_in_process(cifar.main, *common, *flags, '--seed', 8, '--save', f'logs/summary/{name}', cwd=workdir))
    runs = {d: summarize.describe_run(d, summarize.read_records(d))
            for d in (str(workdir / 'logs/summary/with_init'), str(workdir / 'logs/summary/main_term'))}
    with_init, main_term = runs.values()
    assert with_init['epochs'] == [1] and with_init['finished']
    assert with_init['errors'] == [100 - log_lines(workdir / 'logs/summary/with_init')[-1]['test_acc']]
    assert json.loads(with_init['config'])['init_epochs'] == 1 and 'init_epochs' not in json.loads(main_term['config'])
    assert 'init_epochs 1' in summarize.method_weights(with_init['options'])
    assert 'fsp_loss' in log_lines(workdir / 'logs/summary/main_term')[0]  # FSP without init stage: a main term


def as_double(params):
    return {k: v.double() for k, v in flatten(params).items()}


def test_the_learned_parts_compute_what_repdistillers_modules_compute():
    """AB's connectors (Connector: ConvReg without ReLU), FT's paraphraser (without BNs) and
    translator, checked against torch modules built as RepDistiller builds them and holding
    the same weights, in training mode and float64."""
    nn = torch.nn
    torch.manual_seed(0)
    for shape_s, shape_t, conv in [((4, 8, 8), (6, 4, 4), nn.Conv2d(4, 6, 3, stride=2, padding=1)),
                                   ((4, 4, 4), (6, 8, 8), nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1)),
                                   ((4, 6, 6), (6, 4, 4), nn.Conv2d(4, 6, (3, 3)))]:
        params = as_double({'c': parts.convreg_params(shape_s, shape_t)})
        (kind,) = {k.split('.')[1] for k in params} - {'bn'}
        module = nn.Sequential(conv, nn.BatchNorm2d(6)).double()
        with torch.no_grad():
            module[0].weight.copy_(params[f'c.{kind}.weight'])
            module[0].bias.copy_(params[f'c.{kind}.bias'])
        x = torch.randn(5, *shape_s, dtype=torch.float64)
        torch.testing.assert_close(parts.convreg(x, params, 'c', True), module(x), rtol=1e-12, atol=1e-12)
    assert parts.convreg_params((6, 4, 4), (6, 4, 4)) == {}  # identity where the shapes match

    def leaky(*layers):
        return [m for layer in layers for m in (layer, nn.LeakyReLU(0.1))]
    params = as_double({'p': ft.paraphraser_params(8, 0.5), 't': ft.translator_params(6, 8, 0.5)})
    encoder = nn.Sequential(*leaky(nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 4, 3, 1, 1), nn.Conv2d(4, 4, 3, 1, 1)))
    decoder = nn.Sequential(*leaky(nn.ConvTranspose2d(4, 4, 3, 1, 1), nn.ConvTranspose2d(4, 8, 3, 1, 1),
                                   nn.ConvTranspose2d(8, 8, 3, 1, 1)))
    translator = nn.Sequential(*[m for conv in (nn.Conv2d(6, 6, 3, 1, 1), nn.Conv2d(6, 4, 3, 1, 1),
                                                nn.Conv2d(4, 4, 3, 1, 1))
                                 for m in (conv, nn.BatchNorm2d(conv.out_channels), nn.LeakyReLU(0.1))])
    with torch.no_grad():
        for i, (e, d, t) in enumerate(zip(encoder[::2], decoder[::2], translator[::3])):
            for m, name in ((e, f'p.conv{i}'), (d, f'p.deconv{i}'), (t, f't.conv{i}')):
                m.weight.copy_(params[name + '.weight'])
                m.bias.copy_(params[name + '.bias'])
    encoder, decoder, translator = encoder.double(), decoder.double(), translator.double()
    g_t, g_s = torch.randn(5, 8, 4, 4, dtype=torch.float64), torch.randn(5, 6, 4, 4, dtype=torch.float64)
    factor = ft.paraphrase(g_t, params, 'p')
    torch.testing.assert_close(factor, encoder(g_t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ft.reconstruct(factor, params, 'p'), decoder(encoder(g_t)), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(ft.translate(g_s, params, 't', True), translator(g_s), rtol=1e-12, atol=1e-12)


def test_init_epochs_draw_their_own_batches():
    """Init epoch j of I draws the loader's epoch j - I: zero and negative epochs are valid
    seeds, differ from each other and from the main stage's epochs, and repeat exactly."""
    images, labels = torch.arange(40 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(
        40, 3, 32, 32), torch.arange(40) % 10
    loader = Loader(images, labels, 8, train=True, seed=3)

    def batches(epoch):
        loader.set_epoch(epoch)
        return torch.cat([index for _, _, _, index in loader])

    orders = {e: batches(e) for e in (-2, -1, 0, 1, 2)}
    assert all(not torch.equal(orders[a], orders[b]) for a in orders for b in orders if a < b)
    assert torch.equal(batches(-1), orders[-1])


@pytest.mark.parametrize('flags, phrases', [
    (['--init_epochs', 5], ['--init_epochs 5', '--ab_beta, --fsp_beta, --ft_beta']),
    (['--init_lr', 0.01], ['--init_lr 0.01', 'none of them is on']),
    (['--ab_beta', 1, '--teacher_id', 'wide', '--init_epochs', 0], ['--ab_beta trains only in the init stage']),
    (['--ft_beta', 1, '--teacher_id', 'wide', '--ft_rate', 0], ['--ft_rate 0', '(0, 1]']),
    (['--ft_beta', 1, '--teacher_id', 'wide', '--ft_rate', 1.5], ['--ft_rate 1.5', '(0, 1]']),
    (['--fsp_beta', 1, '--teacher_id', 'half', '--init_lr', 0], ['--init_lr 0', 'not positive']),
    (['--fsp_beta', 1, '--teacher_id', 'half', '--init_lr', -1], ['--init_lr -1', 'not positive']),
    (['--fsp_beta', 1, '--teacher_id', 'half', '--init_epochs', -1], ['--init_epochs -1', 'negative']),
    # RepDistiller's FSP script passes -b 50, which its FSP never reads; weighing the init stage by it diverges
    (['--fsp_beta', 50, '--teacher_id', 'half'], ['--fsp_beta 50 would weigh the init stage', 'use --fsp_beta 1']),
    (['--fsp_beta', 50, '--teacher_id', 'half', '--init_epochs', 2], ['--fsp_beta 50 would weigh the init stage']),
    (['--teacher_id', 'wide', '--cohort', json.dumps([{'name': 'a', 'init_epochs': 3}])],
     ["member 'a'", '--init_epochs 3']),
])
def test_stage_options_without_their_method_are_one_line_errors(small_tree, workdir, flags, phrases):
    before = sorted(os.listdir(workdir / 'logs'))
    expect_user_error(run_in_process(cifar.main, *RUN, '--epochs', 1, '--dataroot', small_tree, *flags,
                                     '--save', 'logs/refused', cwd=workdir), *phrases)
    assert sorted(os.listdir(workdir / 'logs')) == before

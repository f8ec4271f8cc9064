import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cifar
import methods
from engine.devices import cpu_has_bf16, speed_settings, to_channels_last_
from engine.errors import UserError
from engine.members import build_members, join_networks, learning_rate, restore
from engine.meters import MeanStd
from engine.options import epoch_steps
from engine.training import make_steps
from resnet import resnet


def options(**kw):
    base = dict(lr=0.1, lr_decay_ratio=0.2, temperature=4, alpha=0.9, beta=1e3, reference=False,
                dtype='float', compile='auto', at_p=2, at_form='code', beta_decay=1, grad_beta=0,
                sym_beta=0, factt_beta=0, fitnet_beta=0, cos_beta=0, aux_weight=0, ngpu=1,
                deterministic=False, compile_mode='default', precision='auto')
    flags = argparse.ArgumentParser()
    methods.add_arguments(flags)  # all off, settings at their defaults
    return argparse.Namespace(**{**vars(flags.parse_args([])), **base, **kw})


def test_learning_rate_drops_at_each_listed_epoch():
    opt = options()
    lrs = [learning_rate(opt, e, [3, 5]) for e in range(1, 7)]
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004])


def test_epoch_step_must_be_a_json_list_of_increasing_epochs():
    assert epoch_steps('[60, 120]') == [60, 120] and epoch_steps('[]') == []
    for bad in ('60,120', '[1.5]', '{"a": 1}', '[120, 60]', '[0, 5]'):
        assert epoch_steps(bad) is None


def test_mean_std_meter_is_the_sample_std_over_batches():
    m = MeanStd(lambda o: o)
    m.reset()
    values = [0.5, 1.5, 4.0, 2.0]
    for v in values:
        m.update((torch.tensor(v), 1))
    mean, std = m.compute()
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    m.reset()
    m.update((torch.tensor(3.0), 1))
    assert m.compute() == [3.0, None]


@pytest.mark.parametrize('has_bf16', ['0', '1'])
def test_reference_switches_everything_off(has_bf16, monkeypatch):
    monkeypatch.setenv('AT_CPU_BF16', has_bf16)
    cpu = torch.device('cpu')
    ref = speed_settings(options(reference=True, compile='on'), cpu, 200)
    assert not (ref.autocast or ref.channels_last or ref.fused or ref.compile)
    fast = speed_settings(options(), cpu, 200)
    assert fast.channels_last and fast.fused and fast.compile and fast.autocast == (has_bf16 == '1')
    assert not speed_settings(options(), cpu, 3).compile  # too short to pay for compiling
    assert not speed_settings(options(compile='off'), cpu, 200).compile
    assert not speed_settings(options(dtype='double'), cpu, 200).autocast


@pytest.mark.parametrize('has_bf16', ['0', '1'])
def test_precision_fp32_and_bf16_override_the_hardware_on_the_fast_path(has_bf16, monkeypatch, capsys):
    monkeypatch.setenv('AT_CPU_BF16', has_bf16)
    cpu = torch.device('cpu')
    fp32 = speed_settings(options(precision='fp32'), cpu, 200)
    assert not fp32.autocast and fp32.channels_last and fp32.fused and fp32.compile
    bf16 = speed_settings(options(precision='bf16'), cpu, 200)
    assert bf16.autocast and bf16.channels_last and bf16.fused and bf16.compile
    # emulated bf16 is only slower: one line says so, where it is emulated
    said = capsys.readouterr().out
    assert said.count('has no bf16 units') == (has_bf16 == '0'), said


def test_at_cpu_bf16_forces_the_detection_and_refuses_other_values(monkeypatch):
    monkeypatch.setenv('AT_CPU_BF16', '0')
    assert cpu_has_bf16() is False
    monkeypatch.setenv('AT_CPU_BF16', '1')
    assert cpu_has_bf16() is True
    monkeypatch.setenv('AT_CPU_BF16', 'yes')
    with pytest.raises(UserError, match="AT_CPU_BF16='yes' is neither 0 nor 1"):
        cpu_has_bf16()
    monkeypatch.delenv('AT_CPU_BF16')
    check = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    assert cpu_has_bf16() == bool(check and check())


def test_bf16_autocast_loss_is_close_to_fp32():
    torch.manual_seed(0)
    f_s, p_s = resnet(10, 1, 10)
    f_t, p_t = resnet(10, 2, 10)
    transfer, params = join_networks(options(), f_s, p_s,
                                     (lambda x, p, prefix: f_t(x, p, False, prefix), p_t))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    weights = transfer.weights(1, [])

    def objective(terms):
        return sum(weights[n.rstrip('0123456789')] * v for n, v in terms.items())

    ref = objective(transfer(x, y, params, False)[1])
    with torch.autocast('cpu', torch.bfloat16):
        y_s, terms = transfer(x, y, params, False)
        fast = objective(terms)
    assert y_s.dtype == torch.bfloat16 and terms['at0'].dtype == torch.float32
    assert fast.dtype == torch.float32
    assert abs(fast.item() - ref.item()) / ref.item() < 2e-2


def test_compiled_step_updates_bn_statistics_like_eager():
    """The running statistics are tensors in the parameter dict, mutated in place by
    F.batch_norm; compilation must keep those writes."""
    torch.manual_seed(1)
    f, params = resnet(10, 0.5, 10)
    copy = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def loss(p):
        return torch.nn.functional.cross_entropy(f(x, p, True)[0], y)

    loss(params).backward()
    torch.compile(loss, dynamic=False)(copy).backward()
    for k in params:
        torch.testing.assert_close(copy[k], params[k], rtol=1e-4, atol=1e-5)
        if params[k].requires_grad:
            torch.testing.assert_close(copy[k].grad, params[k].grad, rtol=1e-3, atol=1e-4)
    assert not torch.equal(params['bn.running_mean'], torch.zeros_like(params['bn.running_mean']))



def test_a_compiled_cohort_trains_as_an_eager_one_with_its_gradient_members_eager(tmp_path):
    """The compiled step through the command line, in fp32: a cohort whose plain member is
    compiled and whose --sym_beta member (differentiated twice) is left eager ends where the
    same cohort run eagerly ends. --compile on refuses a --sym_beta member, so the compiled
    command gets its compilation from --compile auto, which compiles runs of 10 epochs or more
    (one step each here)."""
    import json

    from torch._dynamo.utils import counters

    from conftest import make_image_tree, run_in_process
    make_image_tree(str(tmp_path / 'data'), n_train=16, n_test=16)
    members = '[{"name": "plain", "seed": 1}, {"name": "sym", "seed": 2, "sym_beta": 1}]'
    common = ['--depth', 10, '--width', 1, '--batch_size', 16, '--nthread', 1, '--epochs', 10, '--dataroot', 'data',
              '--precision', 'fp32', '--cohort', members]
    graphs = counters['stats']['unique_graphs']
    try:
        for compile in ('auto', 'off'):
            result = run_in_process(cifar.main, *common, '--compile', compile, '--save', f'logs/{compile}',
                                    cwd=tmp_path)
            assert result.returncode == 0, result.stderr[-3000:]
            if compile == 'auto':  # the plain member's training and evaluation forwards, no more
                assert counters['stats']['unique_graphs'] - graphs == 2, dict(counters['stats'])
    finally:
        torch._dynamo.reset()  # later tests should not find this test's graphs cached

    def run(compile, name):
        path = tmp_path / 'logs' / compile / name
        lines = [json.loads(line[len('json_stats: '):]) for line in open(path / 'log.txt')]
        return [r['train_loss'] for r in lines], torch.load(path / 'model.pt7', weights_only=True)['params']

    # The member left eager computes the same operations in both commands: bit for bit.
    (losses, params), (eager_losses, eager_params) = run('auto', 'sym'), run('off', 'sym')
    assert losses == eager_losses and all(torch.equal(params[k], v) for k, v in eager_params.items())
    # The compiled member's kernels add in another order. Its first step starts from the same
    # parameters, so its loss differs by fp32 rounding (measured 0 to 1e-7); the difference then
    # grows about threefold a step (1e-4 after 10, 1-2% in the smallest-norm tensor, a
    # batch-norm bias). A changed computation (a lost batch-norm update, a wrong gradient)
    # shows from the first step or moves parameters by their own size.
    (losses, params), (eager_losses, eager_params) = run('auto', 'plain'), run('off', 'plain')
    assert losses[0] == pytest.approx(eager_losses[0], rel=1e-5)
    assert losses == pytest.approx(eager_losses, rel=1e-2)
    for k, v in eager_params.items():
        gap = ((params[k] - v).norm() / v.norm()).item()
        assert gap < 0.1, (k, gap)

def trainable(params):
    return [v for v in params.values() if v.requires_grad]


def test_restored_momentum_takes_the_layout_of_channels_last_parameters():
    """A checkpoint of an NCHW run (--reference, the original code) resumed on the fast path:
    fused SGD walks parameter and momentum buffer in memory order, so the buffer must be
    channels_last like its parameter; the step must equal plain SGD's."""
    torch.manual_seed(0)
    _, nchw = resnet(10, 1, 10)
    plain = torch.optim.SGD(trainable(nchw), 0.1, momentum=0.9, weight_decay=5e-4)
    for p in trainable(nchw):
        p.grad = torch.randn_like(p)
    plain.step()  # random momentum buffers
    state = {'params': {k: v.detach().clone() for k, v in nchw.items()}, 'optimizer': plain.state_dict(),
             'epoch': 1}
    fast = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in nchw.items()}
    to_channels_last_(fast)
    fused = torch.optim.SGD(trainable(fast), 0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    restore(state, fast, fused, True, 'model.pt7')
    for p, q in zip(trainable(nchw), trainable(fast)):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone().contiguous(memory_format=torch.channels_last) if q.dim() == 4 else p.grad.clone()
    plain.step()
    fused.step()
    for k in nchw:
        torch.testing.assert_close(fast[k], nchw[k], rtol=1e-6, atol=1e-6)
    assert fast['group0.block0.conv0'].is_contiguous(memory_format=torch.channels_last)


def test_bf16_is_chosen_by_compute_capability_not_emulation(monkeypatch):
    """V100 and T4 (compute capability 7.x) emulate bf16 more slowly than fp32."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    cuda = torch.device('cuda')
    try:
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: (7, 0))
        assert not speed_settings(options(), cuda, 200).autocast
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: (9, 0))
        fast = speed_settings(options(), cuda, 200)
        assert fast.autocast and torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        # the reference path is the original arithmetic: no TF32 rounding of fp32 convolutions
        assert not speed_settings(options(reference=True), cuda, 200).autocast
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_split_batches_are_not_compiled():
    """--ngpu and torchrun run eagerly (compile was never shown to work there)."""
    assert not speed_settings(options(ngpu=2, compile='on'), torch.device('cpu'), 200).compile


def steps_of(*flags, speed, teacher=False, epoch=1, device='cpu'):
    """Members of a WRN-10 cohort (one run unless --cohort is among `flags`; a WRN-10-1 teacher
    with `teacher`) ready to step on `device`, and their training and evaluation steps."""
    opt = cifar.parse_args(['--save', 'unused', '--depth', '10', '--width', '0.5', '--seed', '0',
                            *(['--teacher_id', 't'] if teacher else []), *map(str, flags)])
    from engine.cohort import member_runs
    runs = member_runs(opt, cifar.CIFAR_RULES, 'teacher_id')
    for run in runs:
        run.seed = 0 if run.seed is None else run.seed
    torch.manual_seed(0)
    f_t, p_t = resnet(10, 1, 10)
    t = (lambda x, p, prefix: f_t(x, p, False, prefix), {k: v.requires_grad_(False) for k, v in p_t.items()})
    members = build_members(runs, lambda: resnet(10, 0.5, 10), t if teacher else None, image_size=32,
                            device=torch.device(device), channels_last=speed.channels_last)
    for m in members:
        m.start(speed.fused, 10, 1, torch.device(device))
        m.weights.update(m.objective.weights(epoch, []))
    return members, make_steps(members, speed)


def cpu_speed(autocast=False, **kw):
    return SimpleNamespace(**{**dict(autocast=autocast, channels_last=True, fused=True, compile=False,
                                     compile_mode='default', device_type='cpu'), **kw})


def test_evaluation_is_fp32_while_training_uses_bf16_autocast():
    [m], (train_step, eval_step) = steps_of(speed=cpu_speed(autocast=True))
    engine = SimpleNamespace(state=SimpleNamespace(iteration=1))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert train_step(engine, (x, y, 1.0, torch.arange(len(y))))[m]['y_pred'].dtype == torch.bfloat16
    m.evaluating = True
    assert eval_step(engine, (x, y, 1.0, torch.arange(len(y))))[m]['y_pred'].dtype == torch.float32


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host (on a GPU, a sync):
    .item(), bool(), int(), float(), nonzero, equal."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(s in func.__name__ for s in ('_local_scalar_dense', 'nonzero', 'equal')):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('teacher', [False, True])
def test_training_steps_and_meters_read_nothing_back_to_the_host(teacher):
    flags = ['--cohort', '[{"name": "a", "beta": 1000, "alpha": 0.9}, {"name": "b"}]'] if teacher else []
    members, (train_step, _) = steps_of(*flags, speed=cpu_speed(), teacher=teacher)
    for m in members:
        m.train_meters.reset()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with HostReads() as mode:
        for i in range(1, 21):
            outputs = train_step(SimpleNamespace(state=SimpleNamespace(iteration=i)), (x, y, 1.0, torch.arange(len(y))))
            for m, out in outputs.items():
                m.train_meters.update(out)
    assert mode.reads == []
    for m in members:
        assert m.train_meters.compute()['loss'][0] > 0

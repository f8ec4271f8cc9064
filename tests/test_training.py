import argparse

import numpy as np
import pytest
import torch

from errors import UserError
from resnet import resnet
from training import MeanStd, learning_rate, parse_epoch_step, speed_settings, join_networks, \
    cpu_has_bf16


def options(**kw):
    base = dict(lr=0.1, lr_decay_ratio=0.2, temperature=4, alpha=0.9, beta=1e3, reference=False,
                dtype='float', compile='auto', at_p=2, at_form='code', beta_decay=1, grad_beta=0,
                sym_beta=0, factt_beta=0, fitnet_beta=0, cos_beta=0, aux_weight=0, ngpu=1)
    return argparse.Namespace(**{**base, **kw})


def test_learning_rate_drops_at_each_listed_epoch():
    opt = options()
    lrs = [learning_rate(opt, e, [3, 5]) for e in range(1, 7)]
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004])


def test_epoch_step_must_be_a_json_list():
    assert parse_epoch_step('[60, 120]') == [60, 120]
    for bad in ('60,120', '[1.5]', '{"a": 1}'):
        with pytest.raises(UserError, match='--epoch_step'):
            parse_epoch_step(bad)


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


def test_reference_switches_everything_off():
    cpu = torch.device('cpu')
    ref = speed_settings(options(reference=True, compile='on'), cpu, 200)
    assert not (ref.autocast or ref.channels_last or ref.fused or ref.compile)
    fast = speed_settings(options(), cpu, 200)
    assert fast.channels_last and fast.fused and fast.compile and fast.autocast == cpu_has_bf16()
    assert not speed_settings(options(), cpu, 3).compile  # too short to pay for compiling
    assert not speed_settings(options(compile='off'), cpu, 200).compile
    assert not speed_settings(options(dtype='double'), cpu, 200).autocast


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

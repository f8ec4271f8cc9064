import json
import os

import pytest
import torch

from checkpoint import save_checkpoint, load_checkpoint, copy_params_, load_optimizer_state, \
    read_log, append_log
from errors import UserError
from resnet import resnet


def trained_optimizer(params):
    opt = torch.optim.SGD([v for v in params.values() if v.requires_grad], 0.1, momentum=0.9)
    sum(v.sum() for v in params.values() if v.requires_grad).backward()
    opt.step()
    return opt


def test_save_is_atomic_and_loads_with_weights_only(tmp_path):
    _, params = resnet(10, 1, 10)
    opt = trained_optimizer(params)
    save_checkpoint(str(tmp_path), params, opt, 3)
    assert os.listdir(tmp_path) == ['model.pt7']  # no temporary file left behind
    raw = torch.load(tmp_path / 'model.pt7', map_location='cpu', weights_only=True)
    assert set(raw) == {'params', 'optimizer', 'epoch'} and raw['epoch'] == 3
    state = load_checkpoint(str(tmp_path / 'model.pt7'))
    _, fresh = resnet(10, 1, 10)
    copy_params_(fresh, state['params'], 'ckpt')
    for k in params:
        assert torch.equal(fresh[k], params[k].detach())
    opt2 = torch.optim.SGD([v for v in fresh.values() if v.requires_grad], 0.1, momentum=0.9)
    load_optimizer_state(opt2, state['optimizer'], 'ckpt')
    b1 = opt.state[next(iter(opt.state))]['momentum_buffer']
    b2 = opt2.state[next(iter(opt2.state))]['momentum_buffer']
    assert torch.equal(b1, b2)


def test_old_serialisation_with_separate_stats_loads(tmp_path):
    _, params = resnet(10, 1, 10)
    weights = {k: v.detach() for k, v in params.items() if 'running' not in k}
    stats = {k: v.detach() + 1 for k, v in params.items() if 'running' in k}
    torch.save({'params': weights, 'stats': stats, 'epoch': 5, 'optimizer': None},
               tmp_path / 'model.pt7', _use_new_zipfile_serialization=False)
    state = load_checkpoint(str(tmp_path / 'model.pt7'))
    assert state['epoch'] == 5 and set(state['params']) == set(params)
    assert torch.equal(state['params']['bn.running_var'], stats['bn.running_var'])


def test_shape_mismatch_names_the_tensor_before_copying():
    _, params = resnet(10, 2, 10)
    _, wider = resnet(10, 3, 10)
    before = params['conv0'].clone()
    with pytest.raises(UserError, match=r'group0.block0.conv0 has shape \(48, 16, 3, 3\), expected \(32, 16, 3, 3\)'):
        copy_params_(params, {k: v.detach() for k, v in wider.items()}, 'x.pt7')
    assert torch.equal(params['conv0'], before)
    with pytest.raises(UserError, match='lacks conv0'):
        copy_params_(params, {}, 'x.pt7')


def test_optimizer_state_must_fit(tmp_path):
    _, small = resnet(10, 2, 10)
    _, wide = resnet(10, 3, 10)
    state = trained_optimizer(wide).state_dict()
    opt = torch.optim.SGD([v for v in small.values() if v.requires_grad], 0.1, momentum=0.9)
    with pytest.raises(UserError, match=r'optimizer state for parameter 1 has shape \(48, 16, 3, 3\)'):
        load_optimizer_state(opt, state, 'x')


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    p = tmp_path / 'model.pt7'
    p.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read checkpoint'):
        load_checkpoint(str(p))
    with pytest.raises(UserError, match='does not exist'):
        load_checkpoint(str(tmp_path / 'missing.pt7'))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    torch.save({'params': {}, 'evil': Evil()}, tmp_path / 'model.pt7')
    with pytest.raises(UserError, match='cannot read checkpoint'):
        load_checkpoint(str(tmp_path / 'model.pt7'))


def test_log_round_trip_and_foreign_lines(tmp_path):
    append_log(str(tmp_path), {'epoch': 1, 'test_acc': 50.0})
    with open(tmp_path / 'log.txt', 'a') as f:
        f.write('some other output\n')
    append_log(str(tmp_path), {'epoch': 2, 'test_acc': 60.0})
    assert [r['epoch'] for r in read_log(str(tmp_path))] == [1, 2]
    line = (tmp_path / 'log.txt').read_text().splitlines()[0]
    assert line.startswith('json_stats: ') and json.loads(line[12:])['test_acc'] == 50.0

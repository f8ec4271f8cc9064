import errno
import io
import json
import os
from unittest import mock

import pytest
import torch

from engine.checkpoint import (
    WriteFailed,
    append_log,
    copy_params_,
    load_checkpoint,
    load_optimizer_state,
    read_log,
    repair_log,
    save_checkpoint,
)
from engine.errors import UserError
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


def test_optimizer_state_follows_its_parameters_by_name_whatever_their_order(tmp_path):
    """A later version may build a run's parameters in another order (a method's parts first,
    say): the momentum of each saved parameter reaches the parameter of its name, for checkpoints
    that name them and for older ones, whose own params give the order their optimizer had."""
    def momenta(params, order):
        trained = [k for k in order if params[k].requires_grad]
        opt = torch.optim.SGD([params[k] for k in trained], 0.1, momentum=0.9)
        for i, k in enumerate(trained):
            params[k].grad = torch.full_like(params[k], float(i + 1))
        opt.step()
        return opt, {k: opt.state[params[k]]['momentum_buffer'] for k in trained}

    _, params = resnet(10, 1, 10)
    opt, saved = momenta(params, list(params))
    save_checkpoint(str(tmp_path), params, opt, 1)
    state = load_checkpoint(str(tmp_path / 'model.pt7'))
    assert state['optimizer']['param_groups'][0]['param_names'] == list(saved)
    older = {**state['optimizer'], 'param_groups': [{k: v for k, v in g.items() if k != 'param_names'}
                                                    for g in state['optimizer']['param_groups']]}
    for optimizer_state in (state['optimizer'], older):
        _, fresh = resnet(10, 1, 10)
        reordered = list(reversed(fresh))
        names = [k for k in reordered if fresh[k].requires_grad]
        opt2 = torch.optim.SGD([fresh[k] for k in names], 0.1, momentum=0.9)
        load_optimizer_state(opt2, optimizer_state, 'ckpt', names, state['params'])
        for k in names:
            assert torch.equal(opt2.state[fresh[k]]['momentum_buffer'], saved[k]), k


def full_disk_halfway(real_save=torch.save):
    """A torch.save that gets half its bytes onto its target, then finds the disk full."""
    def save(obj, f, *args, **kwargs):
        data = io.BytesIO()
        real_save(obj, data, *args, **kwargs)
        half = data.getvalue()[:len(data.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, 'wb') as out:
                out.write(half)
        else:
            f.write(half)
            if hasattr(f, 'flush'):
                f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_an_interrupted_or_failed_save_leaves_the_previous_checkpoint(tmp_path):
    _, params = resnet(10, 1, 10)
    opt = trained_optimizer(params)
    save_checkpoint(str(tmp_path), params, opt, 3)
    with mock.patch('torch.save', full_disk_halfway()), pytest.raises(OSError) as failed:
        save_checkpoint(str(tmp_path), params, opt, 4)
    assert load_checkpoint(str(tmp_path / 'model.pt7'))['epoch'] == 3
    assert str(failed.value) == f'cannot write {tmp_path}/model.pt7 (No space left on device)'
    fsync = os.fsync
    # the temporary file written in full, but never made durable
    with mock.patch('os.fsync', side_effect=[OSError(errno.EIO, os.strerror(errno.EIO))]), \
            pytest.raises(WriteFailed, match=r'\(Input/output error\)'):
        save_checkpoint(str(tmp_path), params, opt, 5)
    assert os.fsync is fsync
    assert os.listdir(tmp_path) == ['model.pt7']  # the temporary file removed
    assert load_checkpoint(str(tmp_path / 'model.pt7'))['epoch'] == 3


def test_a_text_file_is_not_taken_for_a_checkpoint(tmp_path):
    (tmp_path / 'log.txt').write_text('json_stats: {"epoch": 1, "test_acc": 50.0}\n')
    with pytest.raises(UserError, match=r'log.txt: it is a text file, not a model.pt7 checkpoint'):
        load_checkpoint(str(tmp_path / 'log.txt'))


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


def test_a_torn_last_line_is_left_out_with_a_warning_and_a_bad_line_elsewhere_is_an_error(tmp_path, capsys):
    append_log(str(tmp_path), {'epoch': 1, 'test_acc': 50.0})
    with open(tmp_path / 'log.txt', 'a') as f:
        f.write('json_stats: {"epoch": 2, "test_')  # the power went while this was appended
    assert [r['epoch'] for r in read_log(str(tmp_path))] == [1]
    [warning] = capsys.readouterr().err.strip().splitlines()
    assert f'{tmp_path}/log.txt: its last line is cut short' in warning and 'resuming the run repairs it' in warning
    with open(tmp_path / 'log.txt', 'a') as f:
        f.write('\n')
    append_log(str(tmp_path), {'epoch': 2, 'test_acc': 60.0})
    with pytest.raises(UserError, match=r'log.txt:2 is not a valid json_stats line'):
        read_log(str(tmp_path))


def test_repair_drops_a_torn_line_and_restores_the_checkpoints_line(tmp_path):
    append_log(str(tmp_path), {'epoch': 1, 'test_acc': 50.0})
    with open(tmp_path / 'log.txt', 'a') as f:
        f.write('json_stats: {"epoch": 2, "te')
    done = repair_log(str(tmp_path), {'epoch': 2, 'test_acc': 60.0})
    assert 'dropped its cut-short last line' in done and 'restored the line of epoch 2' in done
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert [json.loads(line[12:])['epoch'] for line in lines] == [1, 2]
    assert repair_log(str(tmp_path), {'epoch': 2, 'test_acc': 60.0}) is None  # nothing left to do
    os.remove(tmp_path / 'log.txt')  # died between the first checkpoint and its log line
    repair_log(str(tmp_path), {'epoch': 1, 'test_acc': 50.0})
    assert [r['epoch'] for r in read_log(str(tmp_path))] == [1]


def test_a_failing_log_append_names_the_file_and_cause(tmp_path):
    with mock.patch('os.fsync', side_effect=OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))), \
            pytest.raises(WriteFailed, match=r'cannot write .*log.txt \(Disk quota exceeded\)'):
        append_log(str(tmp_path), {'epoch': 1})

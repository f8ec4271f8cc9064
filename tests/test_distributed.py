"""distributed.py in two real gloo processes on the CPU (torch.multiprocessing), and the checks
that keep torchrun's processes on GPUs they have."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
from errors import RunStopped, UserError
from stopping import NonFiniteWatch
from test_training import HostReads, cpu_speed, options, steps_of


def spawn(worker, tmp_path, world=2):
    """Runs worker(rank, world, tmp_path) in `world` gloo processes; returns what each wrote."""
    mp.spawn(start, args=(worker, world, str(tmp_path)), nprocs=world, join=True)
    return [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(world)]


def start(rank, worker, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{tmp}/rendezvous', rank=rank, world_size=world)
    try:
        result = worker(rank, world)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)


def count_step_collectives(rank, world):
    """Three training steps of a cohort of two WRN-10 students: the host reads and all-reduces
    they make."""
    members, (train_step, _) = steps_of('--cohort', '[{"name": "a"}, {"name": "b", "seed": 1}]',
                                        speed=cpu_speed(channels_last=False, fused=False))
    x, y = torch.randn(9, 3, 32, 32), torch.randint(0, 10, (9,))
    share = distributed.share(len(x))
    x, y = distributed.shard(x), distributed.shard(y)

    class Collectives(HostReads):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if 'allreduce' in func.__name__:
                self.reads.append('allreduce')
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Collectives() as mode:
        for i in range(1, 4):
            train_step(SimpleNamespace(state=SimpleNamespace(iteration=i)), (x, y, share))
    n_bn = sum(k.endswith('running_mean') for k in members[0].params)
    return {'ops': mode.reads, 'n_bn': n_bn, 'share': share}


def test_a_step_makes_only_the_collectives_its_arithmetic_needs(tmp_path):
    """Synchronised batch norm needs one all-reduce per BN layer forward and one backward, for
    each of the two students; the gradients of both one more. No host reads: shares are host
    numbers, counts are fills."""
    results = spawn(count_step_collectives, tmp_path)
    for r in results:
        assert r['ops'] == ['allreduce'] * (3 * (2 * 2 * r['n_bn'] + 1)), r['ops']
    assert [r['share'] for r in results] == [5 / 9, 4 / 9]  # 9 samples: 5 on rank 0, 4 on rank 1


def diverge_on_rank_one(rank, world):
    watch = NonFiniteWatch('cpu')
    for step in range(1, 11):
        bad = rank == 1 and step >= 7
        watch.update(step, {'cross_entropy': torch.tensor(float('nan') if bad else 1.0)})
    try:
        watch.check(epoch_length=4, last_checkpoint='logs/x/model.pt7')
    except RunStopped as e:
        return str(e)
    return None


def test_every_process_stops_when_one_diverges(tmp_path):
    """A process that stopped alone would leave the others waiting in their next collective."""
    messages = spawn(diverge_on_rank_one, tmp_path)
    for m in messages:
        assert m is not None and 'diverged at epoch 2, step 3' in m and 'cross_entropy' in m


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: pytest.fail('set_device reached'))
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(UserError, match='only 1 GPU.*--nproc_per_node 1'):
        distributed.init(cuda=True)


def test_ngpu_needs_that_many_visible_gpus_and_gpu_id_is_honoured(monkeypatch, capsys):
    from devices import choose_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3')
    with pytest.raises(UserError, match=r'--ngpu 2 needs 2 GPUs but 1 are visible \(CUDA_VISIBLE_DEVICES=3\)'):
        choose_device(options(ngpu=2, gpu_id='', cuda=False))
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '3'  # left as it was without --gpu_id
    assert choose_device(options(ngpu=1, gpu_id='0', cuda=False)).type == 'cuda'
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '0'
    assert '--gpu_id 0 replaces CUDA_VISIBLE_DEVICES=3' in capsys.readouterr().out


@pytest.mark.parametrize('main_rank', [True, False])
def test_only_rank_0_reports_an_error_and_the_others_leave_after_it(monkeypatch, capsys, main_rank):
    """torchrun kills the other processes once one exits with an error: a rank other than 0
    that left at once could take rank 0's one line with it."""
    import errors
    waits = []
    monkeypatch.setattr(distributed, 'is_main', lambda: main_rank)
    monkeypatch.setattr(errors.time, 'sleep', waits.append)

    @errors.reports_user_errors
    def main():
        raise UserError('--lr -1.0 is not positive')

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith('error: --lr -1.0 is not positive\n') == main_rank
    assert waits == ([] if main_rank else [errors.RANK_0_REPORTS_S]) and errors.RANK_0_REPORTS_S >= 1

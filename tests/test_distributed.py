"""distributed.py in two real gloo processes on the CPU (torch.multiprocessing), and the checks
that keep torchrun's processes on GPUs they have."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import distributed
from engine.errors import RunStopped, UserError
from engine.stopping import NonFiniteWatch
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
    x, y, index = distributed.shard(x), distributed.shard(y), distributed.shard(torch.arange(len(x)))

    class Collectives(HostReads):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if 'allreduce' in func.__name__:
                self.reads.append('allreduce')
            return super().__torch_dispatch__(func, types, args, kwargs)

    with Collectives() as mode:
        for i in range(1, 4):
            train_step(SimpleNamespace(state=SimpleNamespace(iteration=i)), (x, y, share, index))
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


def dot_steps(rank=0, world=1):
    """Three KD+DOT steps (fp64) of a WRN-10 student on one global batch of 8, sharded over the
    processes: the student's tensors after them."""
    members, (train_step, _) = steps_of('--alpha', 0, '--kd_beta', 0.9, '--ce_weight', 0.1, '--dot_delta', 0.075,
                                        '--dtype', 'double', teacher=True,
                                        speed=cpu_speed(channels_last=False, fused=False))
    g = torch.Generator().manual_seed(0)
    for i in range(1, 4):
        x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
        batch = (distributed.shard(x), distributed.shard(y), distributed.share(len(x)),
                 distributed.shard(torch.arange(8)))
        train_step(SimpleNamespace(state=SimpleNamespace(iteration=i)), batch)
    return {k: v.flatten().tolist() for k, v in members[0].params.items() if k.startswith('student.')}


def test_dot_steps_on_a_sharded_batch_as_on_the_whole(tmp_path):
    """DOT sets the distillation gradient aside before the training step's all-reduce: it sums it
    over the processes itself, so two processes on halves step as one on the whole batch."""
    whole = dot_steps()
    for r in spawn(dot_steps, tmp_path):
        for k, v in whole.items():
            got, want = torch.tensor(r[k], dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
            assert (got - want).norm() <= 1e-10 * max(want.norm(), 1e-6), k


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


def progress_and_log_of_two_ranks(rank, world):
    """Three global batches of 9 samples (5 on rank 0, 4 on rank 1), each process's own loss
    on its slice: what the progress bar shows and what the epoch's log line will say."""
    from engine.meters import MeanStd, shown_loss
    meter = MeanStd()
    for loss in ([2.0, 1.0, 3.0], [4.0, 0.5, 1.0])[rank]:
        meter.update((torch.tensor(loss), distributed.share(9)))
    stopped = SimpleNamespace(stopped='diverged', train_meters=None)
    training = SimpleNamespace(stopped=None, train_meters=SimpleNamespace(metrics={'loss': meter}))
    return {'bar': float(shown_loss([stopped, training])), 'log': meter.compute()[0]}


def test_the_progress_bar_shows_the_loss_of_the_whole_batch(tmp_path):
    """Each process's values are weighted by its share of the batch, so one process alone
    showed about half the loss under two processes."""
    expected = sum(5 / 9 * a + 4 / 9 * b for a, b in zip([2.0, 1.0, 3.0], [4.0, 0.5, 1.0])) / 3
    for r in spawn(progress_and_log_of_two_ranks, tmp_path):
        assert r['bar'] == pytest.approx(expected) and r['log'] == pytest.approx(expected), r


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: pytest.fail('set_device reached'))
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(UserError, match='only 1 GPU.*--nproc_per_node 1'):
        distributed.init(cuda=True)


def test_ngpu_needs_that_many_visible_gpus_and_gpu_id_is_honoured(monkeypatch, capsys):
    from engine.devices import choose_device
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
    from engine import stopping
    waits = []
    monkeypatch.setattr(distributed, 'is_main', lambda: main_rank)
    monkeypatch.setattr(stopping.time, 'sleep', waits.append)

    @stopping.reports_user_errors
    def main():
        raise UserError('--lr -1.0 is not positive')

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert capsys.readouterr().err.endswith('error: --lr -1.0 is not positive\n') == main_rank
    assert waits == ([] if main_rank else [stopping.RANK_0_REPORTS_S]) and stopping.RANK_0_REPORTS_S >= 1


def rank_process(launcher_pid, rank):
    """The pid of the worker torchrun started as `rank`."""
    with open(f'/proc/{launcher_pid}/task/{launcher_pid}/children') as f:
        children = f.read().split()
    for pid in children:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            if f'RANK={rank}'.encode() in f.read().split(b'\0'):
                return int(pid)
    raise AssertionError(f'no worker of rank {rank} among {children}')


@pytest.mark.parametrize('killed', [1, 0])
def test_a_killed_process_ends_the_others_with_one_line_saying_how_to_resume(image_tree, tmp_path, killed):
    """kill -9 of one worker: the survivor's next collective fails at once; it says so in one
    line (rank 0 may be the one that died, so any survivor does), not with gloo's traceback."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             os.path.join(ROOT, 'cifar.py'), '--depth', '10', '--batch_size', '10', '--epochs', '100',
                             '--dataroot', image_tree, '--nthread', '1', '--save', 'logs/k'],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = tmp_path / 'logs/k/log.txt'
        deadline = time.time() + 240
        while not (log.exists() and log.read_text().count('json_stats') >= 1):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        os.kill(rank_process(proc.pid, killed), signal.SIGKILL)
        start = time.time()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.time() - start < 30
    ours = [line for line in err.splitlines() if line.startswith('cifar.py: ')]
    assert len(ours) == 1, err[-3000:]
    assert 'a process of this torchrun job died' in ours[0], ours
    assert 'resume from the last checkpoint with --resume logs/k' in ours[0], ours
    assert os.path.join(ROOT, 'training.py') not in err, err[-3000:]  # no traceback of ours

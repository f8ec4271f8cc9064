"""Data-parallel training over processes started by torchrun (one process per GPU, or several
CPU processes with gloo).

Every process holds the whole parameter dict and sees its own slice of every global batch.
Batch-norm statistics are reduced over all processes (so training matches one process running
the whole batch), gradients are summed weighted by shard size, and only rank 0 writes files and
prints. Without torchrun all of this reduces to a single process and no-ops.
"""
import os

import torch
import torch.distributed as dist

from engine.errors import UserError


def launched_by_torchrun():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def init(cuda):
    """Joins the process group torchrun describes; returns this process's device."""
    if cuda:
        local_rank, visible = int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(f'torchrun started process {local_rank} on this node but only {visible} '
                            f'GPU(s) are visible; use --nproc_per_node {visible} (one process per GPU), '
                            f'or CUDA_VISIBLE_DEVICES= to train on CPUs with gloo')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    dist.init_process_group('nccl' if cuda else 'gloo')
    return device


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    # Before the process group exists (argument checks), torchrun's RANK says who is rank 0.
    return dist.get_rank() if active() else int(os.environ.get('RANK', 0))


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    return rank() == 0


def broadcast_object(obj):
    """rank 0's value of a small picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch):
    """This process's contiguous slice of a global batch (sizes differ by at most one)."""
    if not active():
        return batch
    return batch.tensor_split(world_size())[rank()]


def share(n_global):
    """This process's fraction of a global batch of n_global samples, as `shard` splits it. A
    host number: weighting by it costs no communication and no device sync."""
    if not active():
        return 1.0
    n, w = divmod(n_global, world_size())
    return (n + (rank() < w)) / n_global


class AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients too: each process's input
    feeds every process's output, and each process's loss is already weighted by its share."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sync_batch_norm(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5):
    """Training-mode batch norm with mean and variance taken over the global batch: the sums are
    all-reduced (with autograd, so gradients see the global statistics too)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    C = x.shape[1]
    # A fill, not a copy from host memory: building the count costs no device sync.
    count = xf.new_full((1,), xf.numel() / C)
    stats = AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
    n = stats[-1]
    mean = stats[:C] / n
    var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    shape = (1, C, 1, 1)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    return y.to(x.dtype)


def reduce_gradients_(params):
    """Sums the processes' gradients in one all-reduce. Each process's loss was weighted by its
    `share` of the global batch, so the sum is the gradient of the global batch's mean loss."""
    reduce_([p.grad for p in params if p.grad is not None])


def reduce_(grads):
    """Sums each of the tensors `grads` over the processes, in place, in one all-reduce."""
    if not active() or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def collective_device():
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else torch.device('cpu')


def any_rank(flag):
    """True on every rank if `flag` is true on any (a host sync: call it sparingly)."""
    if not active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def first_failure(first, finite):
    """(earliest step at which any process saw a non-finite loss term or -1, whether each term
    was finite on every process): one small all-reduce."""
    if not active():
        return first, finite
    never = torch.iinfo(torch.int64).max
    t = torch.cat([torch.where(first < 0, never, first).view(1), finite.long()])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return torch.where(t[0] == never, -1, t[0]), t[1:].bool()


def all_reduce_sum(t):
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def lost_a_process(error):
    """Whether `error` is a collective failing because another process of the job is gone:
    NCCL raises DistBackendError, gloo a RuntimeError quoting its own source file (its
    'Connection reset by peer' when a process was killed)."""
    return active() and isinstance(error, RuntimeError) and (
        isinstance(error, getattr(dist, 'DistBackendError', ())) or 'gloo' in str(error))


def shutdown():
    if active():
        dist.destroy_process_group()

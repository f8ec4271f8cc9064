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
import torch.distributed.nn.functional as dist_fn  # all_reduce with autograd


def launched_by_torchrun():
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def init(cuda):
    """Joins the process group torchrun describes; returns this process's device."""
    if cuda:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
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


def sync_batch_norm(x, weight, bias, running_mean, running_var, momentum=0.1, eps=1e-5):
    """Training-mode batch norm with mean and variance taken over the global batch: the sums are
    all-reduced (with autograd, so gradients see the global statistics too)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    C = x.shape[1]
    count = xf.new_tensor([xf.numel() / C])
    stats = dist_fn.all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
    n = stats[-1]
    mean = stats[:C] / n
    var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    shape = (1, C, 1, 1)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    return y.to(x.dtype)


def reduce_gradients_(params, n_local):
    """Turns each process's mean-over-its-shard gradient into the gradient of the mean over the
    global batch: one all-reduce of all gradients weighted by shard size, plus the sizes."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_tensor([1.0])]) * n_local
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
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


def all_reduce_sum(t):
    if active():
        t = t.clone()
        dist.all_reduce(t)
    return t


def shutdown():
    if active():
        dist.destroy_process_group()

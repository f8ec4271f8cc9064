"""Where a run computes and how fast: the device (CPU, GPUs, torchrun's process), and the speed
switches of the fast path (bf16 autocast, channels_last, fused SGD, torch.compile) that
--reference turns off."""
import os
from types import SimpleNamespace

import torch

import methods
from engine import distributed
from engine.errors import UserError


def choose_device(opt):
    """The GPU(s) when there are any, else the CPU; under torchrun, this process's GPU (or the
    CPU with gloo) after joining the process group."""
    if opt.gpu_id:
        # Nothing has touched CUDA yet, so the driver still reads this when it starts.
        previous = os.environ.get('CUDA_VISIBLE_DEVICES')
        if previous is not None and previous != opt.gpu_id and distributed.is_main():
            print(f'--gpu_id {opt.gpu_id} replaces CUDA_VISIBLE_DEVICES={previous}')
        os.environ['CUDA_VISIBLE_DEVICES'] = opt.gpu_id
    split = 'torchrun' if distributed.launched_by_torchrun() else '--ngpu > 1' if opt.ngpu > 1 else None
    if split and opt.compile == 'on':
        raise UserError(f'--compile on is not supported with {split} (batches split over devices '
                        f'run eagerly); use --compile auto or off')
    if distributed.launched_by_torchrun():
        if opt.ngpu > 1:
            raise UserError('--ngpu splits batches over GPUs inside one process; under torchrun '
                            'use one process per GPU (--nproc_per_node) and --ngpu 1')
        return distributed.init(cuda=torch.cuda.is_available())
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if opt.cuda and not visible:
        raise UserError('--cuda was given but no CUDA device is visible; drop --cuda to train on the CPU')
    if opt.gpu_id and opt.gpu_id.split(',') != ['-1'] and not visible:  # -1 hides every GPU: the CPU, asked for
        raise UserError(f'--gpu_id {opt.gpu_id} names a GPU, and no CUDA device is visible; drop --gpu_id to train '
                        f'on the CPU')
    if opt.ngpu > max(visible, 1):
        shown = os.environ.get('CUDA_VISIBLE_DEVICES')
        shown = f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''
        raise UserError(f'--ngpu {opt.ngpu} needs {opt.ngpu} GPUs but {visible} are visible{shown}; '
                        f'use --ngpu {max(visible, 1)} or make more GPUs visible, e.g. --gpu_id 0,1')
    return torch.device('cuda' if visible else 'cpu')


# Testing aid: AT_CPU_BF16=1 or 0 makes this CPU count as one with or without bf16 units, so
# that one machine can check what --precision auto does on the other kind.
FORCE_CPU_BF16 = 'AT_CPU_BF16'


def usable_cores():
    """The CPU cores this process may run on (its affinity, which a container or taskset may
    narrow), where the system says; else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def cpu_has_bf16():
    """oneDNN runs bf16 convolutions fast only on CPUs with AVX512-BF16 or AMX units; elsewhere
    it emulates them, slower than fp32. AT_CPU_BF16 (1 or 0), when set, answers instead."""
    forced = os.environ.get(FORCE_CPU_BF16, '')
    if forced:
        if forced not in ('0', '1'):
            raise UserError(f'{FORCE_CPU_BF16}={forced!r} is neither 0 nor 1; set {FORCE_CPU_BF16}=1 (a CPU '
                            f'with bf16 units) or 0 (one without), or unset it to detect the CPU')
        return forced == '1'
    check = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    return bool(check and check())


def cuda_has_bf16(device):
    """bf16 tensor cores arrived with Ampere (compute capability 8.0). torch's
    is_bf16_supported() also counts emulation, which on a V100 or T4 is slower than fp32."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def uses_channels_last(opt):
    """The fast path computes in channels_last (NHWC in memory), which oneDNN and cuDNN run
    faster; --reference and --dtype runs keep the original NCHW."""
    return not opt.reference and opt.dtype == 'float'


def trains_in_bf16(opt, device):
    """Whether the fast path trains under bf16 autocast: --precision bf16 or fp32 says so, auto
    where the hardware has bf16 units. --reference and --dtype runs never autocast (options.py
    refuses --precision bf16 with either)."""
    if not uses_channels_last(opt) or opt.precision == 'fp32':
        return False
    has_bf16 = cuda_has_bf16(device) if device.type == 'cuda' else cpu_has_bf16()
    if opt.precision == 'bf16' and not has_bf16 and distributed.is_main():
        # Emulated bf16 gives the same arithmetic, only slower: worth a word, not a refusal.
        where = 'this GPU (compute capability below 8.0)' if device.type == 'cuda' else \
            'this CPU (no AVX512-BF16 or AMX)'
        print(f'--precision bf16: {where} has no bf16 units; bf16 is emulated, slower than fp32 '
              f'(--precision auto would train in fp32 here)', flush=True)
    return opt.precision == 'bf16' or has_bf16


def speed_settings(opt, device, epochs_to_run):
    """bf16 autocast (--precision) and channels_last where the hardware is fast at them, a fused
    optimizer, and torch.compile for runs long enough to win back its start-up cost. --reference
    turns all of it off: fp32, NCHW, plain SGD, no TF32, the original's arithmetic."""
    fast = uses_channels_last(opt)
    bf16 = trains_in_bf16(opt, device)
    # Compiling takes about a minute per graph on a 2-core CPU (train, eval, and each partial
    # last batch are separate graphs) and saves about 30% of every step after that.
    # Gradient-based terms differentiate twice, which compiled graphs do not support (a cohort
    # leaves those members uncompiled); batches split over GPUs (--ngpu) or processes
    # (torchrun) run eagerly: neither has been measured compiled, and the collectives inside
    # synchronised batch norm would split the graph.
    compile = fast and not methods.double_backward(opt) and opt.ngpu == 1 and not distributed.active() and \
        (opt.compile == 'on' or (opt.compile == 'auto' and epochs_to_run >= 10))
    if device.type == 'cuda':
        # TF32 rounds fp32 matmul and convolution inputs to 10 mantissa bits: fast, but not the
        # original arithmetic. The input shapes never change, so cuDNN may pick its fastest
        # algorithms once, unless every run must repeat bit for bit.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not opt.reference
        torch.backends.cudnn.benchmark = not opt.deterministic
    if opt.deterministic:
        # cuBLAS needs a fixed workspace to reduce in a fixed order; it reads this variable when
        # it starts, which is after this point (nothing has run on the GPU yet).
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.deterministic = True
        # Some backward kernels (adaptive pooling of the auxiliary heads) have no deterministic
        # CUDA version: warn about those rather than refuse the run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    return SimpleNamespace(autocast=bf16, channels_last=fast, fused=fast, compile=compile,
                           compile_mode=opt.compile_mode, device_type=device.type)


def to_channels_last_(params):
    for k, v in params.items():
        if v.dim() == 4:
            params[k] = v.detach().contiguous(memory_format=torch.channels_last).requires_grad_(v.requires_grad)

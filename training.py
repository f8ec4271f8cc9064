"""The training loop shared by cifar.py and imagenet.py, on an ignite Engine.

One epoch: set the learning rate for the epoch, run the training steps (meters accumulate on
the device), evaluate on the test set, write the checkpoint, then append the epoch's line to
log.txt. The log line comes after the checkpoint, so a log line always has its checkpoint.
Under torchrun each process trains on its slice of every batch (distributed.py) and only rank 0
prints and writes.
"""
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from ignite.metrics import Accuracy, Metric, TopKCategoricalAccuracy

import distributed
from checkpoint import CHECKPOINT, LOG, save_checkpoint, load_checkpoint, copy_params_, \
    load_optimizer_state, append_log, rng_state, set_rng_state
from errors import UserError, RunStopped
from stopping import SignalStop, NonFiniteWatch
from transfer import Transfer, add_transfer_loss_arguments, double_backward, kind, step_schedule


# ----------------------------------------------------------------------------------------------
# What is optimised

def join_networks(opt, f_s, params_s, teacher=None, image_size=32):
    """(transfer, params) to train: the objective of transfer.py over the student alone, or over
    student and teacher (f_t, params_t) in one dict under 'student.' and 'teacher.' prefixes,
    plus whatever 'aux.' parameters the chosen methods train."""
    if teacher is None:
        transfer, params = Transfer(opt, f_s), params_s
    else:
        f_t, params_t = teacher
        transfer = Transfer(opt, f_s, f_t)
        params = {**{'student.' + k: v for k, v in params_s.items()},
                  **{'teacher.' + k: v for k, v in params_t.items()}}
    return transfer, transfer.add_aux_params(params, image_size)


def learning_rate(opt, epoch, epoch_step):
    """LR of 1-based `epoch`: multiplied by lr_decay_ratio from each listed epoch on."""
    return step_schedule(opt.lr, opt.lr_decay_ratio, epoch, epoch_step)


# ----------------------------------------------------------------------------------------------
# Meters

class MeanStd(Metric):
    """Mean and sample standard deviation of one scalar per batch (the reference code's
    AverageValueMeter). Values stay on the device until the epoch ends: no host sync per step.
    Under torchrun each process's value is weighted by its share of the batch and summed, which
    gives the value of the whole batch."""

    def __init__(self, output_transform, device='cpu'):
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self._values = []

    def update(self, output):
        value, share = output
        self._values.append(value.detach().float().reshape(()) * share)

    def running_mean(self):
        return torch.stack(self._values).mean() if self._values else float('nan')

    def compute(self):
        if not self._values:
            return [None, None]
        v = distributed.all_reduce_sum(torch.stack(self._values)).double().cpu()
        std = v.std().item() if len(v) > 1 else None  # undefined for a single batch
        return [v.mean().item(), std]


def attach_meters(engine, term_names, topk, device):
    """Attaches loss, accuracy and one meter per loss term; returns the loss meter."""
    loss = MeanStd(lambda o: (o['loss'], o['share']), device)
    loss.attach(engine, 'loss')
    Accuracy(lambda o: (o['y_pred'], o['y']), device=device).attach(engine, 'top1')
    if topk > 1:
        TopKCategoricalAccuracy(topk, lambda o: (o['y_pred'], o['y']), device=device).attach(engine, f'top{topk}')
    for name in term_names:
        MeanStd(lambda o, name=name: (o['terms'][name], o['share']), device).attach(engine, 'term:' + name)
    return loss


# ----------------------------------------------------------------------------------------------
# Fast path and reference path: the same step, different switches

def cpu_has_bf16():
    """oneDNN runs bf16 convolutions fast only on CPUs with AVX512-BF16 or AMX units; elsewhere
    it emulates them, slower than fp32."""
    check = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    return bool(check and check())


def speed_settings(opt, device, epochs_to_run):
    """bf16 autocast and channels_last where the hardware is fast at them, a fused optimizer, and
    torch.compile for runs long enough to win back its start-up cost. --reference turns all of it
    off: fp32, NCHW, plain SGD, the original's arithmetic."""
    fast = not opt.reference and opt.dtype == 'float'
    bf16 = fast and (torch.cuda.is_bf16_supported() if device.type == 'cuda' else cpu_has_bf16())
    # Compiling takes about a minute per graph on a 2-core CPU (train, eval, and each partial
    # last batch are separate graphs) and saves about 30% of every step after that.
    # Gradient-based terms differentiate twice, which compiled graphs do not support.
    compile = fast and not double_backward(opt) and \
        (opt.compile == 'on' or (opt.compile == 'auto' and epochs_to_run >= 10))
    return SimpleNamespace(autocast=bf16, channels_last=fast, fused=fast, compile=compile,
                           device_type=device.type)


def to_channels_last_(params):
    for k, v in params.items():
        if v.dim() == 4:
            params[k] = v.detach().contiguous(memory_format=torch.channels_last).requires_grad_(v.requires_grad)


# ----------------------------------------------------------------------------------------------
# Run set-up shared by the scripts

def add_transfer_and_run_arguments(p):
    """The flags cifar.py and imagenet.py share, with the reference code's defaults."""
    p.add_argument('--temperature', default=4, type=float)
    p.add_argument('--alpha', default=0, type=float, help='weight of the KD term')
    p.add_argument('--beta', default=0, type=float, help='weight of the AT terms')
    add_transfer_loss_arguments(p)
    p.add_argument('--seed', default=None, type=int, help='random seed (drawn and logged if omitted)')
    # Speed
    p.add_argument('--reference', action='store_true',
                   help='fp32, NCHW, plain SGD: the original arithmetic (default: bf16 autocast and '
                        'channels_last where the hardware is fast at them)')
    p.add_argument('--compile', default='auto', choices=['auto', 'on', 'off'],
                   help='torch.compile the forward and loss (auto: for runs of 10 or more epochs)')
    # Device options
    p.add_argument('--cuda', action='store_true', help='require a GPU (one is used whenever present)')
    p.add_argument('--save', default='', type=str, help='save parameters and logs in this folder')
    p.add_argument('--ngpu', default=1, type=int, help='number of GPUs to use for training')
    p.add_argument('--gpu_id', default='0', type=str, help='id(s) for CUDA_VISIBLE_DEVICES')


def choose_device(opt):
    """The GPU when there is one, else the CPU; under torchrun, this process's GPU (or the CPU
    with gloo) after joining the process group."""
    if distributed.launched_by_torchrun():
        if opt.ngpu > 1:
            raise UserError('--ngpu splits batches over GPUs inside one process; under torchrun '
                            'use one process per GPU (--nproc_per_node) and --ngpu 1')
        return distributed.init(cuda=torch.cuda.is_available())
    os.environ.setdefault('CUDA_VISIBLE_DEVICES', str(opt.gpu_id))
    if torch.cuda.is_available():
        return torch.device('cuda')
    if opt.cuda:
        raise UserError('--cuda was given but no CUDA device is visible; drop --cuda to train on the CPU')
    if opt.ngpu > 1:
        raise UserError(f'--ngpu {opt.ngpu} needs CUDA devices and none is visible; use --ngpu 1')
    return torch.device('cpu')


def seed_everything(opt):
    """Uses --seed, or draws one and writes it into the options so the log records it."""
    if opt.seed is None:
        opt.seed = distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31))
    random.seed(opt.seed)
    np.random.seed(opt.seed)
    torch.manual_seed(opt.seed)


def check_run_dir(opt):
    """--save names a new run, or the run being resumed: never append to another run's log."""
    if not opt.save:
        raise UserError('--save is required: name a directory for the log and checkpoint, '
                        'e.g. --save logs/wrn16-1')
    existing = [n for n in (LOG, CHECKPOINT) if os.path.exists(os.path.join(opt.save, n))]
    if existing and not opt.resume:
        raise UserError(f'{opt.save} already holds a run ({", ".join(existing)}); pass '
                        f'--resume {os.path.join(opt.save, CHECKPOINT)} to continue it or choose '
                        f'another --save')
    if opt.resume:
        load_checkpoint(opt.resume)  # fail now, before anything is created, if it is unreadable


def start_run(opt):
    """What every run does before it loads data: report its options, refuse bad ones before
    anything is written, join torchrun's processes, seed. Returns the device to train on."""
    if distributed.is_main():
        print('parsed options:', vars(opt))
    parse_epoch_step(opt.epoch_step)
    check_run_dir(opt)
    device = choose_device(opt)
    seed_everything(opt)
    return device


def parse_epoch_step(text):
    import json
    try:
        steps = json.loads(text)
        assert isinstance(steps, list) and all(isinstance(s, int) for s in steps)
    except (ValueError, AssertionError):
        raise UserError(f'--epoch_step {text!r} is not a JSON list of epochs, e.g. "[60,120,160]"') from None
    return steps


# ----------------------------------------------------------------------------------------------
# The loop

def train(opt, transfer, params, train_loader, test_loader, *, n_parameters, num_classes, device,
          topk=1):
    """Trains params['student.*'] (or all trainable params) with SGD, evaluating, logging and
    checkpointing after every epoch; resumes from --resume if given."""
    epoch_step = parse_epoch_step(opt.epoch_step)
    state = load_checkpoint(opt.resume) if opt.resume else None
    start_epoch = state['epoch'] if state else 0
    # A run stopped mid-epoch resumes at the step after the last one it took.
    start_iteration = (state.get('iteration') or 0) if state else 0
    start_iteration = max(start_iteration, start_epoch * len(train_loader))
    speed = speed_settings(opt, device, opt.epochs - start_epoch)
    if speed.channels_last:
        to_channels_last_(params)
    trainable = [v for v in params.values() if v.requires_grad]
    optimizer = torch.optim.SGD(trainable, opt.lr, momentum=0.9, weight_decay=opt.weight_decay,
                                fused=speed.fused or None)
    if state:
        restore(state, params, optimizer, speed, opt.resume)
    if start_epoch >= opt.epochs:
        print(f'{opt.resume} has already trained {start_epoch} of {opt.epochs} epochs; nothing to do')
        return
    main = distributed.is_main()
    if main:
        os.makedirs(opt.save, exist_ok=True)
    checkpoint_path = os.path.join(opt.save, CHECKPOINT)
    watch = NonFiniteWatch(device)

    weights = {}  # of each kind of loss term, set at the start of each epoch
    train_step, eval_step = make_steps(opt, transfer, params, optimizer, weights, speed, watch, device)

    trainer, evaluator = Engine(train_step), Engine(eval_step)
    for engine in (trainer, evaluator):
        engine.logger.disabled = True  # it would repeat every exception's message before we report it
    train_loss = attach_meters(trainer, transfer.term_names(), topk, device)
    attach_meters(evaluator, [], topk, device)
    if main:
        # The bar reads the epoch's mean loss every few steps only: each read is a host sync.
        ProgressBar(persist=False).attach(trainer, output_transform=lambda _: {'loss': train_loss.running_mean()},
                                          event_name=Events.ITERATION_COMPLETED(every=10))

    def synchronized_time():
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter()

    @trainer.on(Events.EPOCH_STARTED)
    def set_learning_rate(engine):
        engine.state.epoch_start = synchronized_time()
        epoch = engine.state.epoch
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(opt, epoch, epoch_step)
        weights.update(transfer.weights(epoch, epoch_step))
        if epoch in epoch_step and engine.state.iteration % len(train_loader) == 0:
            # The reference code builds a new optimizer at each step, so momentum restarts.
            optimizer.state.clear()
        train_loader.set_epoch(epoch, skip=engine.state.iteration % len(train_loader))

    def save(engine, epochs_done):
        if main:
            save_checkpoint(opt.save, params, optimizer, epochs_done, iteration=engine.state.iteration,
                            rng=rng_state(), lr=optimizer.param_groups[0]['lr'], options=vars(opt))

    def stop(engine):
        engine.state.stopped_by = signals.name()
        engine.terminate()

    @trainer.on(Events.ITERATION_COMPLETED)
    def stop_if_asked_or_diverged(engine):
        if engine.state.iteration % 10 == 0:
            watch.check(len(train_loader), last_good(engine))
        # At an epoch's last step, stop after its evaluation and log line instead (below).
        if engine.state.iteration % len(train_loader) and signals.requested(engine.state.iteration):
            watch.check(len(train_loader), last_good(engine))
            save(engine, engine.state.epoch - 1)
            stop(engine)

    def last_good(engine):
        return checkpoint_path if engine.state.epoch > 1 or start_epoch else None

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate_and_log(engine):
        train_time = synchronized_time() - engine.state.epoch_start
        watch.check(len(train_loader), last_good(engine))
        test_start = time.perf_counter()
        test_state = evaluator.run(test_loader)
        stats = epoch_record(engine, test_state, transfer.term_names(), topk, train_time,
                             synchronized_time() - test_start)
        stats.update(num_classes=num_classes, n_parameters=n_parameters, loss_weights=dict(weights))
        save(engine, engine.state.epoch)
        if main:
            append_log(opt.save, {**vars(opt), **stats})
            print(f'==> id: {opt.save} ({engine.state.epoch}/{opt.epochs}), '
                  f'test_acc: \33[91m{stats["test_acc"]:.2f}\033[0m, train_loss: {stats["train_loss"]:.4f}, '
                  f'time: {train_time:.1f}s + {stats["test_time"]:.1f}s', flush=True)
        if engine.state.epoch < opt.epochs and signals.requested():
            stop(engine)

    train_loader.set_epoch(start_iteration // len(train_loader) + 1, skip=start_iteration % len(train_loader))
    with SignalStop() as signals:
        if start_iteration:
            trainer.load_state_dict({'iteration': start_iteration, 'max_epochs': opt.epochs,
                                     'epoch_length': len(train_loader)})
            trainer.run(train_loader)
        else:
            trainer.run(train_loader, max_epochs=opt.epochs)
    if getattr(trainer.state, 'stopped_by', None):
        step = trainer.state.iteration % len(train_loader)
        where = f'at epoch {trainer.state.epoch}, step {step}' if step else f'after epoch {trainer.state.epoch}'
        raise RunStopped(f'stopped by {trainer.state.stopped_by} {where}; checkpoint written: resume '
                         f'with --resume {checkpoint_path} --save {opt.save}', exit_code=128 + (signals.signum or 15))
    distributed.shutdown()


def make_steps(opt, transfer, params, optimizer, weights, speed, watch, device):
    """The training and evaluation steps: one forward (fp32, or bf16 under autocast; compiled or
    not) giving the loss terms, their weighted sum as the loss, and outputs for the meters."""
    trainable = [v for v in params.values() if v.requires_grad]

    def forward(x, y, mode):
        if speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(speed.device_type, torch.bfloat16, enabled=speed.autocast):
            return transfer(x, y, params, mode)

    if speed.compile:
        forward = torch.compile(forward, dynamic=False)

    def weighted_sum(terms):
        # Terms of weight 0 (AT while only distilling, say) are logged but not differentiated.
        return sum(weights[kind(n)] * v for n, v in terms.items() if weights[kind(n)])

    def share(x):
        """This process's fraction of the global batch, on the device (no host sync)."""
        if not distributed.active():
            return 1
        n = torch.tensor(float(len(x)), device=device)
        return n / distributed.all_reduce_sum(n)

    def train_step(engine, batch):
        x, y = batch
        y_s, terms = forward(x, y, True)
        loss = weighted_sum(terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.reduce_gradients_(trainable, len(x))
        optimizer.step()
        watch.update(engine.state.iteration, terms)
        # No .item() here: meters keep device tensors and are read once per epoch.
        return {'loss': loss.detach(), 'y_pred': y_s.detach(), 'y': y, 'share': share(x),
                'terms': {n: v.detach() for n, v in terms.items()}}

    @torch.no_grad()
    def eval_step(engine, batch):
        x, y = batch
        y_s, terms = forward(x, y, False)
        return {'loss': weighted_sum(terms), 'y_pred': y_s, 'y': y, 'share': share(x)}

    return train_step, eval_step


def epoch_record(trainer, test_state, term_names, topk, train_time, test_time):
    """The per-epoch fields of a log line, named as the reference code names them; each loss
    term's [mean, std] over the epoch's training batches goes under '<kind>_loss', per-group
    terms in a list under '<kind>_losses' ('at_losses' is the reference code's field)."""
    m, t = trainer.state.metrics, test_state.metrics
    stats = {
        'train_loss': m['loss'][0], 'train_acc': 100 * m['top1'],
        'test_loss': t['loss'][0], 'test_acc': 100 * t['top1'],
        'epoch': trainer.state.epoch, 'train_time': train_time, 'test_time': test_time,
        'at_losses': [],
    }
    for name in term_names:
        if name[-1].isdigit():
            stats.setdefault(kind(name) + '_losses', []).append(m['term:' + name])
        else:
            stats[name + '_loss'] = m['term:' + name]
    if topk > 1:
        stats[f'train_top{topk}'] = 100 * m[f'top{topk}']
        stats[f'test_top{topk}'] = 100 * t[f'top{topk}']
    return stats


def restore(state, params, optimizer, speed, source):
    """Parameters, optimizer and random generators from a checkpoint (ours or the reference
    code's, which has no generator state)."""
    copy_params_(params, state['params'], source)
    if state['optimizer'] is not None:
        load_optimizer_state(optimizer, state['optimizer'], source)
        for group in optimizer.param_groups:  # the file's choice of kernel is not ours
            group.update(fused=speed.fused or None, foreach=None)
    if state.get('rng'):
        set_rng_state(state['rng'])

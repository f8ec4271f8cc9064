"""The training loop shared by cifar.py and imagenet.py, on an ignite Engine.

A command trains one run or a cohort of runs (cohort.py) in lock-step; each run is a `Member`
with its own options, student, optimizer, meters and directory, and all of them share the
batches and one teacher forward per batch. A single run is a cohort of one.

One epoch: set the learning rate and loss weights for the epoch, run the training steps
(meters accumulate on the device), evaluate on the test set, then, for each run, write the
checkpoint and append the epoch's line to its log.txt. The log line comes after the
checkpoint, so a log line always has its checkpoint. Under torchrun each process trains on its
slice of every batch (distributed.py) and only rank 0 prints and writes.
"""
import os
import re
import sys
import time

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

import distributed
import tensorboard_log
from checkpoint import (
    CHECKPOINT,
    WriteFailed,
    append_log,
    check_finite,
    copy_params_,
    load_checkpoint,
    load_optimizer_state,
    repair_log,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cohort import seed_generators
from devices import speed_settings, uses_channels_last
from errors import LostProcess, RunStopped
from meters import Meters, shown_loss
from options import epoch_steps
from stopping import WRITE_FAILED, NonFiniteWatch, SignalStop, resume_flags, standing_checkpoints, write_failure
from transfer import BENCHMARK_SETTINGS, BENCHMARK_WEIGHTS, Transfer, double_backward, kind, step_schedule
from utils import cast

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
# The runs

class Member:
    """One run: its options (its own directory, seed and loss options), student (and the shared
    teacher) in one parameter dict, optimizer, meters and divergence watch."""

    def __init__(self, opt, transfer, params, n_parameters):
        self.opt, self.transfer, self.params, self.n_parameters = opt, transfer, params, n_parameters
        self.name = os.path.basename(opt.save) if opt.cohort else opt.save
        self.trainable = [v for v in params.values() if v.requires_grad]
        self.stopped = None  # why the run stopped early, once it has
        self.evaluating = False

    def start(self, fused, epoch_length, topk, device):
        """Optimizer, meters and, when resuming, the checkpoint's state. Returns the iteration
        after which this run trains (0 for a new run)."""
        self.optimizer = torch.optim.SGD(self.trainable, self.opt.lr, momentum=0.9,
                                         weight_decay=self.opt.weight_decay, fused=fused or None)
        self.train_meters = Meters(self.transfer.term_names(), topk, device)
        self.eval_meters = Meters([], topk, device)
        self.watch = NonFiniteWatch(device)
        self.weights = {}  # of each kind of loss term, set at the start of each epoch
        self.start_iteration = 0
        self.record = None  # the log line of the last completed epoch, kept in each checkpoint
        self.saved = None  # what the checkpoint in this run's folder holds, once there is one
        if self.opt.resume:
            state = load_checkpoint(self.opt.resume)
            restore(state, self.params, self.optimizer, fused, self.opt.resume)
            # A run stopped mid-epoch resumes at the step after the last one it took.
            self.start_iteration = max(state.get('iteration') or 0, state['epoch'] * epoch_length)
            self.record = state.get('log')
            if os.path.normpath(self.opt.resume) == os.path.normpath(self.checkpoint):
                self.saved = checkpoint_position(state['epoch'], state.get('iteration'), epoch_length)
                if distributed.is_main():
                    repaired = repair_log(self.opt.save, self.record)
                    if repaired:
                        print(f'{os.path.basename(sys.argv[0])}: {repaired}', file=sys.stderr, flush=True)
        return self.start_iteration

    def trains_at(self, iteration):
        """Whether this run takes step `iteration`: not before the step it resumes after (runs of
        a cohort may have been stopped at different steps), not after it stopped."""
        return self.stopped is None and self.start_iteration < iteration

    def weighted_sum(self, terms):
        # Terms of weight 0 (AT while only distilling, say) are logged but not differentiated.
        return sum(self.weights[kind(n)] * v for n, v in terms.items() if self.weights[kind(n)])

    @property
    def checkpoint(self):
        return os.path.join(self.opt.save, CHECKPOINT)


def checkpoint_position(epochs_done, iteration, epoch_length):
    step = (iteration or 0) - epochs_done * epoch_length
    return f'epoch {epochs_done + 1}, step {step}' if step > 0 else f'after epoch {epochs_done}'


def build_members(runs, make_student, teacher, *, image_size, device, channels_last):
    """A Member for each run's options: its student initialised from its own seed exactly as a
    single run with that seed is (auxiliary parameters included), all of them sharing one copy
    of the teacher on the device."""
    dtype = runs[0].dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def place(v):
        v = cast(v, dtype, device)
        return v.detach().contiguous(memory_format=layout).requires_grad_(v.requires_grad) if v.dim() == 4 else v

    shared = {'teacher.' + k: place(v) for k, v in teacher[1].items()} if teacher else {}
    members = []
    for run in runs:
        seed_generators(run.seed)
        f_s, params_s = make_student()
        n_parameters = sum(p.numel() for p in params_s.values())
        transfer, params = join_networks(run, f_s, params_s, teacher, image_size)
        members.append(Member(run, transfer, {k: shared[k] if k in shared else place(v)
                                              for k, v in params.items()}, n_parameters))
    return members


def restore(state, params, optimizer, fused, source):
    """Parameters, optimizer and random generators from a checkpoint (ours or the reference
    code's, which has no generator state)."""
    check_resumed_state_finite(state, params, source)
    copy_params_(params, state['params'], source)
    if state['optimizer'] is not None:
        load_optimizer_state(optimizer, state['optimizer'], source)
        for group in optimizer.param_groups:  # the file's choice of kernel is not ours
            group.update(fused=fused or None, foreach=None)
            for p in group['params']:
                # A buffer saved from an NCHW run (--reference, the original code) must take its
                # channels_last parameter's layout: the fused kernel walks both in memory order.
                s = optimizer.state.get(p, {})
                if s.get('momentum_buffer') is not None:
                    s['momentum_buffer'] = torch.empty_like(p).copy_(s['momentum_buffer'])
    if state.get('rng'):
        set_rng_state(state['rng'])


def check_resumed_state_finite(state, params, source):
    """A checkpoint written after its run had diverged (by the reference code, or before the
    divergence check existed) would diverge again at once, reported as a new divergence."""
    fix = 'resume from an earlier checkpoint, or start the run again without --resume'
    check_finite({k: v for k, v in state['params'].items() if k in params}, source, fix)
    saved = state['optimizer'] or {}
    ids = [i for group in saved.get('param_groups', []) for i in group['params']]
    names = dict(zip(ids, (k for k, v in params.items() if v.requires_grad)))  # the optimizer's order
    check_finite({f'the momentum of {names.get(i, i)}': s.get('momentum_buffer')
                  for i, s in saved.get('state', {}).items() if isinstance(s, dict)}, source, fix)


# ----------------------------------------------------------------------------------------------
# The steps

def make_steps(members, speed):
    """The training and evaluation steps over all runs: the teacher's forward once per batch,
    then each run's forward (fp32, or bf16 under autocast when training; compiled or not)
    giving its loss terms, their weighted sum, and outputs for its meters. Nothing here reads a
    value back to the host."""
    first = members[0].transfer
    teacher_gradient = any(m.opt.grad_beta for m in members)
    teacher_pooled = any(m.transfer.pooled for m in members)  # one teacher forward serves them all

    def autocast(mode):
        # Evaluation stays in fp32: the reported test accuracy should not depend on the hardware.
        return torch.autocast(speed.device_type, torch.bfloat16, enabled=speed.autocast and mode)

    def teacher_forward(params, x, y, mode):
        with autocast(mode):
            return first.teacher_outputs(x, y, params, mode and teacher_gradient, teacher_pooled)

    def compiled(f, can):
        return torch.compile(f, dynamic=False, mode=speed.compile_mode) if speed.compile and can else f

    teacher_forward = compiled(teacher_forward, not teacher_gradient) if first.f_t else None
    # Runs with the same loss options share one compiled function (params are its argument).
    forwards = {}
    for m in members:
        key = forward_options(m.opt)
        if key not in forwards:
            forwards[key] = compiled(student_forward(m.transfer, autocast), not double_backward(m.opt))
        m.forward = forwards[key]
    if speed.compile:
        # Each distinct set of loss options compiles its own train and eval graphs (and those
        # of a partial last batch).
        torch._dynamo.config.cache_size_limit = max(8, 4 * len(forwards) + 2)
    if speed.compile and speed.compile_mode == 'reduce-overhead':
        # A CUDA graph replays fixed addresses: the optimizer and batch norm update these
        # tensors in place, so they can be recorded as they are instead of copied in each step.
        for v in members[0].params.values():
            torch._dynamo.mark_static_address(v)

    def layout(x):
        return x.contiguous(memory_format=torch.channels_last) if speed.channels_last else x

    def train_step(engine, batch):
        x, y, share = batch  # share: this process's fraction of the global batch (1 without torchrun)
        x = layout(x)
        active = [m for m in members if m.trains_at(engine.state.iteration)]
        teacher = teacher_forward(active[0].params, x, y, True) if teacher_forward else None
        outputs = {}
        for m in active:
            y_s, terms = m.forward(m.params, x, y, True, teacher)
            loss = m.weighted_sum(terms)
            m.optimizer.zero_grad(set_to_none=True)
            (loss * share if share != 1 else loss).backward()
            m.watch.update(engine.state.iteration, terms)
            # No .item() here: meters keep device tensors and are read once per epoch.
            outputs[m] = {'loss': loss.detach(), 'y_pred': y_s.detach(), 'y': y, 'share': share,
                          'terms': {n: v.detach() for n, v in terms.items()}}
        distributed.reduce_gradients_([p for m in active for p in m.trainable])  # one all-reduce
        for m in active:
            m.optimizer.step()
        return outputs

    @torch.no_grad()
    def eval_step(engine, batch):
        x, y, share = batch
        x = layout(x)
        runs = [m for m in members if m.evaluating]
        teacher = teacher_forward(runs[0].params, x, y, False) if teacher_forward else None
        outputs = {}
        for m in runs:
            y_s, terms = m.forward(m.params, x, y, False, teacher)
            outputs[m] = {'loss': m.weighted_sum(terms), 'y_pred': y_s, 'y': y, 'share': share}
        return outputs

    return train_step, eval_step


def forward_options(opt):
    """What a run's forward reads of its options: the values that enter the terms, and which of
    the weighted methods are on (their weights are applied outside the forward)."""
    return (opt.alpha, opt.temperature, opt.at_p, opt.at_form,
            *(bool(getattr(opt, k)) for k in ('grad_beta', 'sym_beta', 'factt_beta', 'fitnet_beta',
                                              'cos_beta', 'aux_weight', *BENCHMARK_WEIGHTS)),
            *(getattr(opt, k) for k in BENCHMARK_SETTINGS if k != 'dkd_warmup'))  # the warm-up is a weight


def student_forward(transfer, autocast):
    def forward(params, x, y, mode, teacher):
        with autocast(mode):
            return transfer(x, y, params, mode, teacher)
    return forward


# ----------------------------------------------------------------------------------------------
# The loop

def train(opt, members, train_loader, test_loader, *, num_classes, device, topk=1, n_images=None):
    """Trains every member's student with SGD on the same batches, evaluating, checkpointing
    and logging each after every epoch; members resume from their checkpoints. `n_images`,
    (training, test) images of the whole dataset, is logged as n_train and n_test."""
    epoch_step = epoch_steps(opt.epoch_step)
    n = len(train_loader)
    fused = uses_channels_last(opt)
    start = min(m.start(fused, n, topk, device) for m in members)
    for m in members:
        if m.start_iteration >= opt.epochs * n:
            print(f'{m.opt.resume} has already trained {m.start_iteration // n} of {opt.epochs} epochs; nothing to do')
    if start >= opt.epochs * n:
        return
    speed = speed_settings(opt, device, opt.epochs - start // n)
    main = distributed.is_main()
    if main:
        for m in members:
            os.makedirs(m.opt.save, exist_ok=True)
    train_step, eval_step = make_steps(members, speed)
    trainer, evaluator = Engine(train_step), Engine(eval_step)
    for engine in (trainer, evaluator):
        engine.logger.disabled = True  # it would repeat every exception's message before we report it

    def update_meters(meters):
        def update(engine):
            for m, output in engine.state.output.items():
                getattr(m, meters).update(output)
        return update

    trainer.add_event_handler(Events.ITERATION_COMPLETED, update_meters('train_meters'))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, update_meters('eval_meters'))
    # The bar reads one run's mean loss every few steps only: each read is a host sync. Every
    # rank takes part in forming the figure (under torchrun a collective), rank 0 shows it.
    every_10 = Events.ITERATION_COMPLETED(every=10)
    trainer.add_event_handler(every_10, lambda engine: setattr(engine.state, 'shown_loss', shown_loss(members)))
    if main:
        ProgressBar(persist=False).attach(trainer, event_name=every_10,
                                          output_transform=lambda _: {'loss': trainer.state.shown_loss})
    curves = tensorboard_log.attach(trainer, members, opt, main)  # <save>/tb/, to watch runs live

    def synchronized_time():
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter()

    @trainer.on(Events.EPOCH_STARTED)
    def start_epoch(engine):
        engine.state.epoch_start = synchronized_time()
        epoch, iteration = engine.state.epoch, engine.state.iteration
        for m in members:
            for group in m.optimizer.param_groups:
                group['lr'] = learning_rate(opt, epoch, epoch_step)
            m.weights.update(m.transfer.weights(epoch, epoch_step))
            if epoch in epoch_step and iteration % n == 0 and m.start_iteration <= iteration:
                # The reference code builds a new optimizer at each step, so momentum restarts.
                m.optimizer.state.clear()
            m.train_meters.reset()
        train_loader.set_epoch(epoch, skip=iteration % n)

    def save(engine, m, epochs_done):
        if main:
            try:
                save_checkpoint(m.opt.save, m.params, m.optimizer, epochs_done, iteration=engine.state.iteration,
                                rng=rng_state(), lr=m.optimizer.param_groups[0]['lr'], options=vars(m.opt),
                                log=m.record)
            except WriteFailed as e:
                raise RunStopped(write_failure(e, m, opt), exit_code=WRITE_FAILED) from None
            m.saved = checkpoint_position(epochs_done, engine.state.iteration, n)

    def check_divergence(engine):
        """Stops each run whose loss is no longer finite at its last good checkpoint; the others
        go on. A single run stops the command."""
        for m in members:
            if not m.trains_at(engine.state.iteration):
                continue
            try:
                last_good = m.checkpoint if engine.state.epoch > 1 or m.start_iteration else None
                m.watch.check(n, last_good)
            except RunStopped as e:
                if len(members) == 1:
                    raise
                m.stopped = f'{m.name}: {e}'
                if main:
                    print(f'{os.path.basename(sys.argv[0])}: cohort member {m.stopped}', file=sys.stderr, flush=True)
        if all(m.stopped for m in members):
            raise RunStopped(f'every member of the cohort {opt.save} stopped: '
                             + '; '.join(m.stopped for m in members), exit_code=1)

    def stop(engine):
        engine.state.stopped_by = signals.name()
        engine.terminate()

    @trainer.on(Events.ITERATION_COMPLETED)
    def stop_if_asked_or_diverged(engine):
        iteration = engine.state.iteration
        if iteration % 10 == 0:
            check_divergence(engine)
        # At an epoch's last step, stop after its evaluation and log lines instead (below).
        if iteration % n and signals.requested(iteration):
            check_divergence(engine)
            for m in members:
                if m.trains_at(iteration):
                    save(engine, m, engine.state.epoch - 1)
            stop(engine)

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate_and_log(engine):
        train_time = synchronized_time() - engine.state.epoch_start
        check_divergence(engine)
        runs = [m for m in members if m.trains_at(engine.state.iteration)]
        test_start = time.perf_counter()
        for m in members:
            m.evaluating = m in runs
            m.eval_meters.reset()
        evaluator.run(test_loader)
        test_time = synchronized_time() - test_start
        for m in runs:
            stats = epoch_record(m, engine.state.epoch, topk, train_time, test_time)
            stats.update(num_classes=num_classes, n_parameters=m.n_parameters, loss_weights=dict(m.weights),
                         autocast='bf16' if speed.autocast else 'off')  # what --precision resolved to
            if n_images:
                stats.update(n_train=n_images[0], n_test=n_images[1])
            if device.type == 'cuda':
                stats['gpu_memory_mib'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            m.record = {**vars(m.opt), **stats}
            save(engine, m, engine.state.epoch)
            if main:
                try:
                    append_log(m.opt.save, m.record)
                except WriteFailed as e:
                    raise RunStopped(write_failure(e, m, opt), exit_code=WRITE_FAILED) from None
                curves.epoch(m, stats, m.optimizer.param_groups[0]['lr'], engine.state.iteration)
                print(f'==> id: {m.opt.save} ({engine.state.epoch}/{opt.epochs}), '
                      f'test_acc: \33[91m{stats["test_acc"]:.2f}\033[0m, train_loss: {stats["train_loss"]:.4f}, '
                      f'time: {train_time:.1f}s + {test_time:.1f}s', flush=True)
        if engine.state.epoch < opt.epochs and signals.requested():
            stop(engine)

    train_loader.set_epoch(start // n + 1, skip=start % n)
    with SignalStop(lambda: standing_checkpoints(opt, members)) as signals, curves:
        try:
            if start:
                trainer.load_state_dict({'iteration': start, 'max_epochs': opt.epochs, 'epoch_length': n})
                trainer.run(train_loader)
            else:
                trainer.run(train_loader, max_epochs=opt.epochs)
        except RuntimeError as e:
            if not distributed.lost_a_process(e):
                raise
            raise LostProcess(lost_process(e, opt, members, trainer), exit_code=1) from None
    if getattr(trainer.state, 'stopped_by', None):
        step = trainer.state.iteration % n
        where = f'at epoch {trainer.state.epoch}, step {step}' if step else f'after epoch {trainer.state.epoch}'
        what = 'checkpoint written' if not opt.cohort else 'every member checkpointed'
        raise RunStopped(f'stopped by {trainer.state.stopped_by} {where}; {what}: '
                         f'resume with {resume_flags(opt, members)}',
                         exit_code=128 + (signals.signum or 15))
    stopped = [m.stopped for m in members if m.stopped]
    if stopped:
        raise RunStopped(f'{len(stopped)} of {len(members)} members of the cohort {opt.save} stopped early: '
                         + '; '.join(stopped), exit_code=1)
    distributed.shutdown()


def lost_process(error, opt, members, trainer):
    """The line a surviving rank ends with: what failed, and where the run can go on from. Rank
    0 wrote the checkpoints; a rank on another machine may not see them, but knows that one was
    written when an epoch before this one finished or the run was resumed."""
    reason = re.sub(r'^\[[^\]]*\]\s*', '', (str(error).strip().splitlines() or [''])[0]).split('. ')[0]
    if trainer.state.epoch > 1 or any(m.start_iteration or os.path.isfile(m.checkpoint) for m in members):
        kept = f'resume from the last checkpoint with {resume_flags(opt, members)}'
    else:
        kept = f'no checkpoint was written to {opt.save} yet: start the run again'
    return f'a process of this torchrun job died or stopped answering ({reason}); every process stopped; {kept}'


def epoch_record(member, epoch, topk, train_time, test_time):
    """The per-epoch fields of a run's log line, named as the reference code names them; each
    loss term's [mean, std] over the epoch's training batches goes under '<kind>_loss',
    per-group terms in a list under '<kind>_losses' ('at_losses' is the reference code's)."""
    m, t = member.train_meters.compute(), member.eval_meters.compute()
    stats = {
        'train_loss': m['loss'][0], 'train_acc': 100 * m['top1'],
        'test_loss': t['loss'][0], 'test_acc': 100 * t['top1'],
        'epoch': epoch, 'train_time': train_time, 'test_time': test_time,
        'at_losses': [],
    }
    for name in member.transfer.term_names():
        if name[-1].isdigit():
            stats.setdefault(kind(name) + '_losses', []).append(m['term:' + name])
        else:
            stats[name + '_loss'] = m['term:' + name]
    if topk > 1:
        stats[f'train_top{topk}'] = 100 * m[f'top{topk}']
        stats[f'test_top{topk}'] = 100 * t[f'top{topk}']
    return stats

"""The training loop shared by cifar.py and imagenet.py, on an ignite Engine.

A command trains one run or a cohort of runs (cohort.py) in lock-step; each run is a `Member`
(members.py) with its own options, student, optimizer, meters and directory, and all of them share the
batches and one teacher forward per batch. A single run is a cohort of one.

One epoch: set the learning rate and loss weights for the epoch, run the training steps
(meters accumulate on the device), evaluate on the test set, then, for each run, write the
checkpoint and append the epoch's line to its log.txt. The log line comes after the
checkpoint, so a log line always has its checkpoint. Under torchrun each process trains on its
slice of every batch (distributed.py) and only rank 0 prints and writes.

A run whose method has an init stage (--init_epochs) trains its init epochs first,
epochs of this same loop with their own terms, a constant --init_lr and their own log lines
("stage": "init"); a cohort runs its longest init stage, and members with shorter ones (or none)
start later, so that every member's main stage falls on the same epochs and batches.
"""
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

import methods
from engine import distributed, tensorboard_log
from engine.checkpoint import (
    WriteFailed,
    append_log,
    rng_state,
    save_checkpoint,
)
from engine.cohort import keep_members
from engine.devices import speed_settings, uses_channels_last
from engine.errors import LostProcess, RunStopped
from engine.members import checkpoint_position, learning_rate
from engine.meters import shown_loss
from engine.objective import kind
from engine.options import epoch_steps
from engine.stopping import WRITE_FAILED, SignalStop, resume_flags, standing_checkpoints, write_failure
from methods.base import Peer
from utils import parameter_counts, print_tensor_dict

# ----------------------------------------------------------------------------------------------
# The steps

def make_steps(members, speed):
    """The training and evaluation steps over all runs: the teacher's forward once per batch,
    then each run's forward (fp32, or bf16 under autocast when training; compiled or not)
    giving its loss terms, their weighted sum, and outputs for its meters. A run whose method
    reads the cohort's other members (methods.base.Peer) takes its backward once every member's
    forward has run: its terms read their logits of this step, from before anyone's update, and
    are computed eagerly beside a compiled forward. Nothing here reads a value back to the host."""
    first = members[0].objective
    teacher_gradient = any(m.objective.teacher_gradient for m in members)
    teacher_pooled = any(m.objective.pooled for m in members)  # one teacher forward serves them all
    teacher_preact = any(m.objective.preact for m in members)
    teacher_stem = any(m.objective.stem for m in members)
    teacher_feature_map = any(m.objective.feature_map for m in members)
    teacher_training = members[0].objective.teacher_training  # the same for all (cohort.member_runs)

    def autocast(mode):
        # Evaluation stays in fp32: the reported test accuracy should not depend on the hardware.
        return torch.autocast(speed.device_type, torch.bfloat16, enabled=speed.autocast and mode)

    def teacher_forward(params, x, y, mode):
        with autocast(mode):
            return first.teacher_outputs(x, y, params, mode and teacher_gradient, teacher_pooled, teacher_preact,
                                       teacher_stem, bool(mode) and teacher_training, teacher_feature_map)

    def compiled(f, can):
        return torch.compile(f, dynamic=False, mode=speed.compile_mode) if speed.compile and can else f

    teacher_forward = compiled(teacher_forward, not teacher_gradient) if first.f_t else None
    # Runs with the same loss options share one compiled function (params are its argument).
    forwards = {}
    for m in members:
        # A method may read its run's own seed and step in the forward: such a run shares it with none.
        key = (forward_options(m.opt), None if m.objective.shares_forward else id(m))
        if key not in forwards:
            forwards[key] = compiled(student_forward(m.objective, autocast), m.objective.compiles)
        m.forward = forwards[key]
    if speed.compile:
        # Each distinct set of loss options compiles its own train and eval graphs (and those
        # of a partial last batch), and an init stage its own training graphs.
        stages = 2 if any(m.init_epochs for m in members) else 1
        torch._dynamo.config.cache_size_limit = max(8, (2 + 2 * stages) * len(forwards) + 2)
    if speed.compile and speed.compile_mode == 'reduce-overhead':
        # A CUDA graph replays fixed addresses: the optimizer and batch norm update these
        # tensors in place, so they can be recorded as they are instead of copied in each step.
        for v in members[0].params.values():
            torch._dynamo.mark_static_address(v)

    def layout(x):
        return x.contiguous(memory_format=torch.channels_last) if speed.channels_last else x

    def train_step(engine, batch):
        # share: this process's fraction of the global batch (1 without torchrun); index: the
        # images' positions in the training set
        x, y, share, index, *strong = batch  # a fifth element: the strong view, for the runs that read it
        x = layout(x)
        active = [m for m in members if m.trains_at(engine.state.iteration)]
        for m in members:
            m.objective.step = m.own(engine.state.iteration)  # a method may draw from (seed, step)
        teacher = teacher_forward(active[0].params, x, y, True) if teacher_forward else None
        strong_view = None
        if strong and any(m.objective.strong_view and m.stage == 'main' for m in active):
            x_strong = layout(strong[0])  # and the teacher's forward on it, once for every run that reads it
            strong_view = (x_strong, teacher_forward(active[0].params, x_strong, y, True) if teacher_forward else None)
        outputs = {}

        def learn(m, y_s, terms):
            loss = m.weighted_sum(terms)
            m.backward(terms, loss, share)
            m.watch.update(m.own(engine.state.iteration), terms)
            # No .item() here: meters keep device tensors and are read once per epoch. An init
            # stage that trains only a method's own parts does not run the student (y_s None).
            outputs[m] = {'loss': loss.detach(), 'y_pred': None if y_s is None else y_s.detach(), 'y': y,
                          'share': share,
                          'terms': {n: v.detach() for n, v in terms.items()}}

        logits, waiting = {}, []
        for m in active:
            reads_strong = m.objective.strong_view and m.stage == 'main'
            y_s, terms = m.forward(m.params, x, y, True, teacher, index=index, stage=m.stage,
                                   **({'strong': strong_view} if reads_strong else {}))
            if m.stage == 'main':
                logits[m] = y_s.detach()
            if m.stage == 'main' and m.objective.peer_methods:
                waiting.append((m, y_s, terms))  # its terms read the others' logits of this step: all of them first
            else:
                learn(m, y_s, terms)
        for m, y_s, terms in waiting:  # every member still at its parameters of before this step
            peers = [Peer(p.opt, z) for p, z in logits.items() if p is not m]
            learn(m, y_s, m.objective.with_peer_terms(terms, y, y_s, peers))
        distributed.reduce_gradients_([p for m in active for p in m.trainable])  # one all-reduce
        for m in active:
            m.optimizer.step()
        return outputs

    @torch.no_grad()
    def eval_step(engine, batch):
        x, y, share, index = batch
        x = layout(x)
        runs = [m for m in members if m.evaluating]
        teacher = teacher_forward(runs[0].params, x, y, False) if teacher_forward else None
        outputs = {}
        for m in runs:
            y_s, terms = m.forward(m.params, x, y, False, teacher, index=index)
            # After an init epoch: the student's plain test cross-entropy.
            loss = m.weighted_sum(terms) if m.stage == 'main' else F.cross_entropy(y_s, y)
            outputs[m] = {'loss': loss, 'y_pred': y_s, 'y': y, 'share': share}
        return outputs

    return train_step, eval_step


def forward_options(opt):
    """What a run's forward reads of its options (methods.base.Flag.forward): the values that enter
    the terms, and which of the weighted methods are on (their weights are applied outside the
    forward)."""
    return tuple(getattr(opt, f.name) if f.forward == 'value' else bool(getattr(opt, f.name))
                 for f in methods.flags() if f.forward)


def student_forward(objective, autocast):
    def forward(params, x, y, mode, teacher, index=None, stage='main', strong=None):
        with autocast(mode):
            return objective(x, y, params, mode, teacher, index=index, stage=stage, strong=strong)
    return forward


# ----------------------------------------------------------------------------------------------
# The loop

def train(opt, members, train_loader, test_loader, *, num_classes, device, topk=1, n_images=None):
    """Trains every member's student with SGD on the same batches, evaluating, checkpointing
    and logging each after every epoch; members resume from their checkpoints. `n_images`,
    (training, test) images of the whole dataset, is logged as n_train and n_test."""
    if distributed.is_main():
        report_start(opt, members)
    epoch_step = epoch_steps(opt.epoch_step)
    n = len(train_loader)
    fused = uses_channels_last(opt)
    # The timeline: the longest init stage of the members, then the main stage's epochs.
    init_epochs = max(m.init_epochs for m in members)
    total = init_epochs + opt.epochs
    for m in members:
        m.idle_epochs = init_epochs - m.init_epochs
    start = min(m.start(fused, n, topk, device) + m.idle_epochs * n for m in members)
    for m in members:
        if m.start_iteration >= (m.init_epochs + opt.epochs) * n:
            after = f' after its {m.init_epochs} init epochs' if m.init_epochs else ''
            print(f'{m.opt.resume} has already trained {m.start_iteration // n - m.init_epochs} of {opt.epochs} '
                  f'epochs{after}; nothing to do')
    if start >= total * n:
        return
    speed = speed_settings(opt, device, total - start // n)
    main = distributed.is_main()
    if main:
        for m in members:
            os.makedirs(m.opt.save, exist_ok=True)
        if opt.cohort:
            keep_members(opt)
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
    trainer.add_event_handler(every_10, lambda engine: setattr(engine.state, 'shown_loss', shown_loss(
        [m for m in members if m.trains_at(engine.state.iteration)])))
    if main and sys.stderr.isatty():  # in a file or a pipe it would leave fragments between the lines
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
            if not m.enter_epoch(epoch):
                continue
            fresh = iteration % n == 0 and m.start_iteration <= m.own(iteration)  # not a resumed epoch
            m.objective.epoch = m.stage_epoch  # for a schedule that a method applies inside its forward
            if m.stage == 'init':
                lr = m.opt.init_lr  # constant, as RepDistiller's init stage
                m.weights = m.objective.weights(m.stage_epoch, epoch_step, stage='init')
            else:
                lr = learning_rate(m.opt, m.stage_epoch, epoch_step)
                m.weights = m.objective.weights(m.stage_epoch, epoch_step)
                decay = m.stage_epoch in epoch_step and m.opt.momentum_at_decay == 'restart'
                if fresh and (decay or m.stage_epoch == 1 and m.init_epochs):
                    # The AT code builds a new optimizer at each decay, and RepDistiller one after the
                    # init stage, so momentum restarts there.
                    m.optimizer.state.clear()
            for group in m.optimizer.param_groups:
                group['lr'] = lr
            m.train_meters.reset()
            if not fresh and m.resumed_meters:  # the first steps of this epoch ran before the resume
                m.train_meters.restore(m.resumed_meters['state'])
            m.resumed_meters = None
        # Main-stage epoch k draws the batches of epoch k, init epoch j of I those of j - I (<= 0),
        # so runs with and without init stage see the same main-stage batches.
        train_loader.set_epoch(epoch - init_epochs, skip=iteration % n)

    def save(engine, m, epochs_done):
        """`epochs_done` of the cohort's timeline; the checkpoint counts the run's own: 'epoch' its
        main-stage epochs, with an init stage also 'init_epochs' and 'init_epochs_done'. In the
        middle of an epoch it also holds the epoch's meters so far ('meters'), so that the resumed
        epoch's line counts every step of it."""
        middle = engine.state.iteration % n != 0
        meters = {'stage': m.stage, 'state': m.train_meters.state()} if middle else None  # every rank joins
        if main:
            own, iteration = epochs_done - m.idle_epochs, m.own(engine.state.iteration)
            stages = ({'init_epochs': m.init_epochs, 'init_epochs_done': min(own, m.init_epochs)}
                      if m.init_epochs else {})
            stages.update({'meters': meters} if meters else {})
            try:
                save_checkpoint(m.opt.save, m.params, m.optimizer, max(own - m.init_epochs, 0), iteration=iteration,
                                rng=rng_state(), lr=m.optimizer.param_groups[0]['lr'], options=vars(m.opt),
                                log=m.record, **stages)
            except WriteFailed as e:
                raise RunStopped(write_failure(e, m, opt), exit_code=WRITE_FAILED) from None
            m.saved = checkpoint_position(iteration, n, m.init_epochs)

    def check_divergence(engine):
        """Stops each run whose loss is no longer finite at its last good checkpoint; the others
        go on. A single run stops the command."""
        for m in members:
            if not m.trains_at(engine.state.iteration):
                continue
            try:
                last_good = m.checkpoint if m.own(engine.state.iteration) > n or m.start_iteration else None
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
            stats = epoch_record(m, m.stage_epoch, topk, train_time, test_time)
            if m.init_epochs:  # the lines of a run without init stage stay as they were
                stats['stage'] = m.stage
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
                curves.epoch(m, stats, m.optimizer.param_groups[0]['lr'], m.own(engine.state.iteration))
                progress = (f'init {m.stage_epoch}/{m.init_epochs}' if m.stage == 'init'
                            else f'{m.stage_epoch}/{opt.epochs}')
                test_acc = highlighted(f'{stats["test_acc"]:.2f}')
                print(f'==> id: {m.opt.save} ({progress}), test_acc: {test_acc}, '
                      f'train_loss: {stats["train_loss"]:.4f}, time: {train_time:.1f}s + {test_time:.1f}s', flush=True)
        if engine.state.epoch < total and signals.requested():
            stop(engine)

    train_loader.set_epoch(start // n + 1 - init_epochs, skip=start % n)
    with SignalStop(lambda: standing_checkpoints(opt, members)) as signals, curves:
        try:
            if start:
                trainer.load_state_dict({'iteration': start, 'max_epochs': total, 'epoch_length': n})
                trainer.run(train_loader)
            else:
                trainer.run(train_loader, max_epochs=total)
        except RuntimeError as e:
            if not distributed.lost_a_process(e):
                raise
            raise LostProcess(lost_process(e, opt, members, trainer), exit_code=1) from None
    if getattr(trainer.state, 'stopped_by', None):
        where = checkpoint_position(trainer.state.iteration, n, init_epochs)
        where = where if where.startswith('after') else f'at {where}'
        what = 'checkpoint written' if not opt.cohort else 'every member checkpointed'
        raise RunStopped(f'stopped by {trainer.state.stopped_by} {where}; {what}: '
                         f'resume with {resume_flags(opt)}',
                         exit_code=128 + (signals.signum or 15))
    stopped = [m.stopped for m in members if m.stopped]
    if stopped:
        raise RunStopped(f'{len(stopped)} of {len(members)} members of the cohort {opt.save} stopped early: '
                         + '; '.join(stopped), exit_code=1)
    distributed.shutdown()


def report_start(opt, members):
    """What the command trains, once all it needs has loaded (an error before it is the only line):
    its options and its networks' parameter counts, or with --param_table every tensor."""
    first, names = members[0], [m.name for m in members]
    print('parsed options:', vars(opt), flush=True)
    if getattr(opt, 'param_table', False):
        print_tensor_dict(first.params, first.n_parameters, names)
    else:
        print(parameter_counts(first.params, first.n_parameters, names), flush=True)


def highlighted(text):
    """Red on a terminal; plain in a file or a pipe, where colour codes are noise."""
    return f'\33[91m{text}\033[0m' if sys.stdout.isatty() else text


def lost_process(error, opt, members, trainer):
    """The line a surviving rank ends with: what failed, and where the run can go on from. Rank
    0 wrote the checkpoints; a rank on another machine may not see them, but knows that one was
    written when an epoch before this one finished or the run was resumed."""
    reason = re.sub(r'^\[[^\]]*\]\s*', '', (str(error).strip().splitlines() or [''])[0]).split('. ')[0]
    if trainer.state.epoch > 1 or any(m.start_iteration or os.path.isfile(m.checkpoint) for m in members):
        kept = f'resume from the last checkpoint with {resume_flags(opt)}'
    else:
        kept = f'no checkpoint was written to {opt.save} yet: start the run again'
    return f'a process of this torchrun job died or stopped answering ({reason}); every process stopped; {kept}'


def epoch_record(member, epoch, topk, train_time, test_time):
    """The per-epoch fields of a run's log line, named as the reference code names them; each
    loss term's [mean, std] over the epoch's training batches goes under '<kind>_loss',
    per-group terms in a list under '<kind>_losses' ('at_losses' is the reference code's)."""
    m, t = member.train_meters.compute(), member.eval_meters.compute()
    stats = {
        'train_loss': m['loss'][0], 'train_acc': 100 * m['top1'] if 'top1' in m else None,  # None: no student ran
        'test_loss': t['loss'][0], 'test_acc': 100 * t['top1'],
        'epoch': epoch, 'train_time': train_time, 'test_time': test_time,
        'at_losses': [],
    }
    for name in member.objective.term_names(stage=member.stage):
        if name[-1].isdigit():
            stats.setdefault(kind(name) + '_losses', []).append(m['term:' + name])
        else:
            stats[name + '_loss'] = m['term:' + name]
    if topk > 1:
        stats[f'train_top{topk}'] = 100 * m[f'top{topk}'] if f'top{topk}' in m else None
        stats[f'test_top{topk}'] = 100 * t[f'top{topk}']
    return stats

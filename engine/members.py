"""The runs a command trains, each a `Member`: its options, student (and the shared teacher) in
one parameter dict, optimizer, meters, divergence watch and place on the cohort's timeline, as
training.py's loop drives them. A single run is a cohort of one."""
import os
import sys

import torch

import methods
from engine import distributed
from engine.checkpoint import (
    CHECKPOINT,
    check_finite,
    copy_params_,
    load_checkpoint,
    load_optimizer_state,
    repair_log,
    saved_param_names,
    set_rng_state,
)
from engine.cohort import seed_generators
from engine.meters import Meters
from engine.objective import Objective, kind
from engine.stopping import NonFiniteWatch
from methods.base import step_schedule
from utils import cast

# ----------------------------------------------------------------------------------------------
# What is optimised

def join_networks(opt, f_s, params_s, teacher=None, image_size=32, train_labels=None):
    """(objective, params) to train: the objective (objective.py) over the student alone, or over
    student and teacher (f_t, params_t) in one dict under 'student.' and 'teacher.' prefixes,
    plus whatever 'aux.' parameters the chosen methods train (a method may keep something per
    training image: `train_labels`, the training set's labels in dataset order)."""
    if teacher is None:
        objective, params = Objective(opt, f_s), params_s
    else:
        f_t, params_t = teacher
        objective = Objective(opt, f_s, f_t)
        params = {**{'student.' + k: v for k, v in params_s.items()},
                  **{'teacher.' + k: v for k, v in params_t.items()}}
    return objective, objective.add_parts(params, image_size, train_labels)


def learning_rate(opt, epoch, epoch_step):
    """LR of 1-based `epoch`: multiplied by lr_decay_ratio from each listed epoch on."""
    return step_schedule(opt.lr, opt.lr_decay_ratio, epoch, epoch_step)


# ----------------------------------------------------------------------------------------------
# The runs

class Member:
    """One run: its options (its own directory, seed and loss options), student (and the shared
    teacher) in one parameter dict, optimizer, meters and divergence watch."""

    def __init__(self, opt, objective, params, n_parameters):
        self.opt, self.objective, self.params, self.n_parameters = opt, objective, params, n_parameters
        self.name = os.path.basename(opt.save) if opt.cohort else opt.save
        self.trainable = [v for v in params.values() if v.requires_grad]
        self.stopped = None  # why the run stopped early, once it has
        self.evaluating = False
        # Its own timeline is its init stage (--init_epochs) and then its main
        # stage. A cohort runs the longest init stage of its members: a run with a shorter one
        # sits out the first idle_epochs, so every main stage falls on the same epochs.
        self.init_epochs = getattr(opt, 'init_epochs', None) or 0
        self.idle_epochs = 0
        self.stage, self.stage_epoch = 'main', 0

    def start(self, fused, epoch_length, topk, device):
        """Optimizer, meters and, when resuming, the checkpoint's state. Returns the iteration
        after which this run trains (0 for a new run)."""
        self.epoch_length = epoch_length
        # One optimizer for both stages: SGD leaves alone what the stage gives no gradient. A
        # method may step its member otherwise (Method.optimizer: DOT).
        self.optimizer = methods.optimizer(self.opt, self.trainable) or torch.optim.SGD(
            self.trainable, self.opt.lr, momentum=0.9, weight_decay=self.opt.weight_decay, fused=fused or None)
        # Each stage has its own terms, so its own meters and divergence watch.
        self.meters = {'main': Meters(self.objective.term_names(), topk, device)}
        self.watches = {'main': NonFiniteWatch(device)}
        if self.init_epochs:
            self.meters['init'] = Meters(self.objective.term_names(stage='init'), topk, device,
                                         accuracy=self.objective.student_runs('init'))
            self.watches['init'] = NonFiniteWatch(device)
        self.train_meters, self.watch = self.meters['main'], self.watches['main']
        self.eval_meters = Meters([], topk, device)
        self.weights = {}  # of each kind of loss term, set at the start of each epoch
        self.start_iteration = 0
        self.record = None  # the log line of the last completed epoch, kept in each checkpoint
        self.resumed_meters = None  # the meters of the epoch a resumed checkpoint was written in
        self.saved = None  # what the checkpoint in this run's folder holds, once there is one
        if self.opt.resume:
            state = load_checkpoint(self.opt.resume)
            restore(state, self.params, self.optimizer, fused, self.opt.resume)
            # A run stopped mid-epoch resumes at the step after the last one it took; 'epoch'
            # counts main-stage epochs, as the reference code's checkpoints do.
            epochs_done = state.get('init_epochs_done', 0) + state['epoch']
            self.start_iteration = max(state.get('iteration') or 0, epochs_done * epoch_length)
            self.record = state.get('log')
            self.resumed_meters = state.get('meters')
            if os.path.normpath(self.opt.resume) == os.path.normpath(self.checkpoint):
                self.saved = checkpoint_position(self.start_iteration, epoch_length, self.init_epochs)
                if distributed.is_main():
                    repaired = repair_log(self.opt.save, self.record)
                    if repaired:
                        print(f'{os.path.basename(sys.argv[0])}: {repaired}', file=sys.stderr, flush=True)
        return self.start_iteration

    def trains_at(self, iteration):
        """Whether this run takes the cohort's step `iteration`: not while it sits out the start
        of the timeline, not before the step it resumes after (runs of a cohort may have been
        stopped at different steps), not after it stopped."""
        return self.stopped is None and self.start_iteration < self.own(iteration)

    def own(self, iteration):
        """The step of this run's own timeline (its checkpoint's 'iteration') at the cohort's step."""
        return iteration - self.idle_epochs * self.epoch_length

    def enter_epoch(self, epoch):
        """Sets stage and stage_epoch for the cohort's 1-based `epoch`; False while idle."""
        own = epoch - self.idle_epochs
        if own < 1:
            return False
        self.stage, self.stage_epoch = ('init', own) if own <= self.init_epochs else ('main', own - self.init_epochs)
        self.train_meters, self.watch = self.meters[self.stage], self.watches[self.stage]
        return True

    def weighted_terms(self, terms):
        # Terms of weight 0 (AT while only distilling, say) are logged but not differentiated.
        return {n: self.weights[kind(n)] * v for n, v in terms.items() if self.weights[kind(n)]}

    def weighted_sum(self, terms):
        return sum(self.weighted_terms(terms).values())

    def backward(self, terms, loss, share):
        """The step's gradients of `loss`, the weighted sum of `terms`, times this process's `share`
        of the batch; an optimizer that takes the terms' gradients apart (Method.optimizer) is
        handed the terms instead."""
        self.optimizer.zero_grad(set_to_none=True)
        apart = getattr(self.optimizer, 'backward', None)
        if apart is not None and self.stage == 'main':
            apart(self.weighted_terms(terms), share)
        else:
            (loss * share if share != 1 else loss).backward()

    @property
    def checkpoint(self):
        return os.path.join(self.opt.save, CHECKPOINT)


def checkpoint_position(iteration, epoch_length, init_epochs=0):
    """Where a run stands after step `iteration` of its timeline, in the log's words."""
    epochs_done, step = divmod(iteration, epoch_length)

    def name(epoch):
        return f'init epoch {epoch}' if epoch <= init_epochs else f'epoch {epoch - init_epochs}'
    if step:
        return f'{name(epochs_done + 1)}, step {step}'
    return f'after {name(epochs_done)}' if epochs_done else 'after epoch 0'


def holding(params, start):
    """A freshly drawn student's `params` replaced by the tensors of --student_params (`start`, in
    the file's dtype until the run casts them), each a copy: the members of a cohort train their own.
    The draw happened anyway, so what is drawn next (the methods' parts) starts as without the flag."""
    return {k: start[k].detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}


def build_members(runs, make_student, teacher, *, image_size, device, channels_last, train_labels=None):
    """A Member for each run's options: its student initialised from its own seed exactly as a
    single run with that seed is (auxiliary parameters included), all of them sharing one copy
    of the teacher on the device. `train_labels` (the training set's, in dataset order) reach the
    methods that keep something per training image."""
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
        labels = None if train_labels is None else train_labels.to(device)
        objective, params = join_networks(run, f_s, params_s, teacher, image_size, labels)
        members.append(Member(run, objective, {k: shared[k] if k in shared else place(v)
                                              for k, v in params.items()}, n_parameters))
    return members


def restore(state, params, optimizer, fused, source):
    """Parameters, optimizer and random generators from a checkpoint (ours or the reference
    code's, which has no generator state)."""
    check_resumed_state_finite(state, params, source)
    copy_params_(params, state['params'], source)
    if state['optimizer'] is not None:
        load_optimizer_state(optimizer, state['optimizer'], source, trainable_names(params), state['params'])
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


def trainable_names(params):
    """The names of the tensors the optimizer trains, in its order."""
    return [k for k, v in params.items() if v.requires_grad]


def check_resumed_state_finite(state, params, source):
    """A checkpoint written after its run had diverged (by the reference code, or before the
    divergence check existed) would diverge again at once, reported as a new divergence."""
    fix = 'resume from an earlier checkpoint, or start the run again without --resume'
    check_finite({k: v for k, v in state['params'].items() if k in params}, source, fix)
    saved = state['optimizer'] or {}
    ids = [i for group in saved.get('param_groups', []) for i in group['params']]
    names = dict(zip(ids, saved_param_names(saved, state['params'], trainable_names(params))))
    check_finite({f'the momentum of {names.get(i, i)}': s.get('momentum_buffer')
                  for i, s in saved.get('state', {}).items() if isinstance(s, dict)}, source, fix)

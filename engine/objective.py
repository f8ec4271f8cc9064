"""What a student learns from in one batch: the terms of the methods a run switches on, and how
much each weighs.

`Objective(opt, f_s, f_t)` asks the registry (methods/) which methods the options switch on and
computes a batch's terms by name, unweighted, in the methods' order (the classification term,
cross-entropy or KD, first; training-only terms are left out of evaluation); `weights(epoch)`
says how much each kind counts in that epoch. Keeping the two apart lets the log report every
term on its own scale and lets a weight follow a schedule without touching the (possibly
compiled) forward. Per-group terms are named after their kind and group ('at0', 'at1', ...) and
share their kind's weight.

With an init stage (--init_epochs, `stage='init'`), its steps compute the init terms of the
methods that have one. Methods with learned parts keep them in the parameter dict under 'aux.',
trained and checkpointed with the student, never deployed with it (add_parts).
"""
import torch

import methods
from engine.errors import UserError
from methods.base import Nets, Outputs
from methods.formulas import input_gradient
from utils import data_parallel, flatten, set_requires_grad_except_bn_


def kind(name):
    """'at2' -> 'at': per-group terms share their kind's weight."""
    return name.rstrip('0123456789')


class Objective:
    """The objective of one run. f_s(x, params, mode, prefix) and f_t(x, params, prefix) each
    return (logits, [group outputs]); called with pooled=True, which only runs whose methods read
    that feature do, also the pooled feature; with preact=True also the groups' outputs before
    their ReLUs, and then f.bn_before_relu names the BNs that set them. With a teacher, both live
    in one dict under 'student.' and 'teacher.', and the teacher always runs in inference mode
    without parameter gradients."""

    def __init__(self, opt, f_s, f_t=None):
        self.opt, self.f_s, self.f_t = opt, f_s, f_t
        self.has_teacher = f_t is not None
        self.prefix = 'student.' if self.has_teacher else ''
        self.methods = [m for m in methods.all_methods() if m.active(opt, self.has_teacher)]
        reads = {r for m in self.methods for r in m.reads}
        # The networks hand out their pooled feature and pre-ReLU groups only to the methods that read them.
        self.pooled = self.has_teacher and 'pooled' in reads
        self.preact = self.has_teacher and 'preact' in reads
        self.stem = self.has_teacher and 'stem' in reads
        self.feature_map = self.has_teacher and 'feature_map' in reads
        self.teacher_training = self.has_teacher and methods.teacher_trains(opt)
        self.teacher_gradient = 'teacher_input_gradient' in reads
        self.double_backward = 'input_gradient' in reads
        # Its training batches carry a strongly augmented second view (datasets/strong_view.py).
        self.strong_view = 'strong_view' in reads
        self.compiles = not self.double_backward and all(m.compiles for m in self.methods)
        self.shares_forward = not any(m.own_forward for m in self.methods)
        # Terms that read the cohort's other members: computed once every member's forward has run.
        self.peer_methods = [m for m in self.methods if 'peers' in m.reads]
        # Resolved by options.resolve_init_stage; a namespace built otherwise has no init stage.
        self.init_stage = bool(getattr(opt, 'init_epochs', None))
        self.n_groups = None  # known once add_parts has looked at the networks
        self.state = {}  # what methods keep for this run besides parameters
        self.replicas = {}  # --ngpu: copies of tensors without gradient on the other GPUs
        self.step = 0  # the global step being trained (set by the training step)
        self.epoch = 1  # the 1-based epoch of the stage being trained (set by the training loop)

    # -- the networks ----------------------------------------------------------------------------

    def network(self, params, prefix):
        """One network's part of the dict: all that --ngpu needs to copy to its GPUs."""
        if self.opt.ngpu == 1:
            return params
        return {k: v for k, v in params.items() if k.startswith(prefix) and not k.startswith('aux.')}

    def asked(self, pooled, preact, stem=False, feature_map=False):
        """The keyword arguments that ask a network for its pooled feature, pre-ReLU groups, stem
        output or unpooled feature map (each asks for the ones before it too): none when none is
        needed, so that networks without them (the ImageNet ones take no preact) run as ever."""
        if feature_map:
            return {'feature_map': True}
        return {'stem': True} if stem else {'preact': True} if preact else {'pooled': True} if pooled else {}

    def student(self, x, params, mode):
        asked = self.asked(self.pooled, self.preact, self.stem, self.feature_map)
        return Outputs(*data_parallel(lambda x, p, m: self.f_s(x, p, m, self.prefix, **asked), x,
                                      self.network(params, self.prefix), mode, range(self.opt.ngpu), self.replicas))

    def teacher(self, x, params, pooled, preact, stem, training=False, feature_map=False):
        asked = {**self.asked(pooled, preact, stem, feature_map), **({'training': True} if training else {})}
        return Outputs(*data_parallel(lambda x, p, m: self.f_t(x, p, 'teacher.', **asked), x,
                                      self.network(params, 'teacher.'), False, range(self.opt.ngpu), self.replicas))

    def teacher_outputs(self, x, y, params, input_gradient_too=False, pooled=None, preact=None, stem=None,
                        training=None, feature_map=None):
        """The teacher's Outputs: computed once per batch and shared by every student that learns
        from it (a cohort), so `pooled`, `preact` and `stem` (default: whether this run needs them)
        are asked for if any of them does. `training` (default: whether this run's method asks for
        it, in a training step) runs it on the batch's statistics, moving its running ones."""
        pooled = self.pooled if pooled is None else pooled
        preact = self.preact if preact is None else preact
        stem = self.stem if stem is None else stem
        feature_map = self.feature_map if feature_map is None else feature_map
        training = self.teacher_training if training is None else training
        if not input_gradient_too:
            with torch.no_grad():
                return self.teacher(x, params, pooled, preact, stem, training, feature_map)
        x_t = x.detach().requires_grad_()
        with torch.enable_grad():
            t = self.teacher(x_t, params, pooled, preact, stem, training, feature_map)
            j_t = input_gradient(t.logits, y, x_t)
        return Outputs(t.logits.detach(), [g.detach() for g in t.groups],
                       None if t.pooled is None else t.pooled.detach(),
                       None if t.preact is None else [p.detach() for p in t.preact],
                       None if t.stem is None else t.stem.detach(),
                       None if t.feature_map is None else t.feature_map.detach(), j_t)

    # -- the terms -------------------------------------------------------------------------------

    def __call__(self, x, y, params, mode, teacher=None, index=None, stage='main', strong=None):
        """(student logits, {term name: unweighted value}). `teacher` holds teacher_outputs() of
        this batch, computed here when not given; `index` the batch's positions in the training
        set. Training-only terms are left out when mode is False. `stage` 'init' gives the
        init-stage terms instead (and None for the logits where the student does not run).
        `strong`, for a run that reads the strong view in a training step: (its images, the
        teacher's Outputs on them or None to compute them here); the student runs on it after
        the batch itself, as the reference runs it, moving its batch-norm statistics twice."""
        if stage == 'init':
            return self.init_terms(x, y, params, teacher)
        if mode and self.double_backward:
            x = x.detach().requires_grad_()
        s = self.student(x, params, mode)
        t = None
        if self.has_teacher:
            t = teacher if teacher is not None else self.teacher_outputs(
                x, y, params, mode and self.teacher_gradient, training=bool(mode) and self.teacher_training)
        b = Batch(self, x, y, params, mode, s, t, index)
        if mode and self.strong_view:
            if strong is None:
                raise ValueError('this run reads a strong view of each batch, and none came with it: build the '
                                 'training Loader with strong_view=True')
            b.x_strong, t_strong = strong
            b.s_strong = self.student(b.x_strong, params, mode)
            if self.has_teacher:
                b.t_strong = t_strong if t_strong is not None else self.teacher_outputs(b.x_strong, y, params)
        terms = {}
        for m in self.methods:
            if (mode or not m.training_only) and m not in self.peer_methods:
                terms.update(m.terms(b))
        return s.logits, terms

    def with_peer_terms(self, terms, y, logits, peers):
        """The terms of a main-stage training step, `terms` (what __call__ gave) with those of the
        methods that read the cohort's other members, in term_names' order. They are computed
        from this run's differentiable `logits` and `peers` (methods.base.Peer: every other member
        taking the step, its options and detached logits) once every member's forward has run, so
        that each member reads the others' predictions from before anyone's update."""
        b = Batch(self, None, y, None, True, Outputs(logits, None), None, None)
        b.peers = peers
        for m in self.peer_methods:
            terms = {**terms, **m.terms(b)}
        return {n: terms[n] for n in self.term_names() if n in terms}

    def init_terms(self, x, y, params, teacher):
        """An init-stage step (RepDistiller's helper/pretrain.py): the init terms of the methods
        that have one; the student runs in training mode where one of them trains it."""
        t = teacher if teacher is not None else self.teacher_outputs(x, y, params)
        # As RepDistiller's init stage: the stem and the groups train, the layers after them do not.
        s = self.student(x, params, 'groups') if self.student_runs('init') else None
        b = Batch(self, x, y, params, True, s, t, index=None)
        terms = {}
        for m in self.methods:
            if m.init_stage:
                terms.update(m.init_terms(b))
        return (None if s is None else s.logits), terms

    def student_runs(self, stage):
        """Whether training steps of `stage` run the student (a method may train only its own
        parts there)."""
        return stage == 'main' or any(m.init_stage == 'trains' for m in self.methods)

    def term_names(self, training=True, stage='main'):
        """The names __call__ returns, in its order: one meter each."""
        if stage == 'init':
            return [n for m in self.methods if m.init_stage for n in m.term_names(self.opt, self, 'init')]
        return [n for m in self.methods if training or not m.training_only
                for n in m.term_names(self.opt, self, 'main')]

    def weights(self, epoch, epoch_step, stage='main'):
        """Weight of each kind of term in 1-based `epoch` of `stage`."""
        weights = {}
        for m in self.methods:
            weights.update(m.weights(self.opt, epoch, epoch_step, stage))
        kinds = {kind(n) for n in self.term_names(stage=stage)}
        active = [k for k in weights if k in kinds]
        return {k: weights[k] for k in methods.in_order(active, methods.WEIGHT_ORDER, active)}

    # -- learned parts ---------------------------------------------------------------------------

    def add_parts(self, params, image_size, train_labels=None):
        """Runs the networks once on a blank image to learn their groups' shapes, then returns
        params with the 'aux.' parts the run's methods learn and keep (a memory of the training
        set, whose labels, in dataset order, are `train_labels`, say). A pair that a method
        cannot compare is refused here, before anything is written."""
        def blank(prefix):  # in the network's dtype: a --student_params file keeps its own until the run casts
            dtype = next(v.dtype for k, v in params.items() if k.startswith(prefix) and v.is_floating_point())
            return torch.zeros(1, 3, image_size, image_size, dtype=dtype)
        asked = self.asked(self.pooled, self.preact, self.stem, self.feature_map)
        with torch.no_grad():
            s = Outputs(*self.f_s(blank(self.prefix), params, False, self.prefix, **asked))
            t = Outputs(*self.f_t(blank('teacher.'), params, 'teacher.', **asked)) if self.has_teacher else None
        self.n_groups = len(s.groups)
        if t is not None and len(t.groups) != len(s.groups):
            raise UserError(f'the student has {len(s.groups)} groups and the teacher {len(t.groups)}; '
                            f'transfer pairs groups one to one, so both need the same number')
        nets = Nets(s, t, self.f_t, params, train_labels)
        parts = {}
        for m in self.methods:
            m.refuse_pair(self.opt, nets)
            own = set_requires_grad_except_bn_(flatten(m.parts(self.opt, nets, self), 'aux.'))
            for k, v in own.items():
                v.requires_grad_(v.requires_grad and k.rsplit('.', 1)[-1] not in m.buffers)
            parts.update(own)
        # Student tensors a method's reference network lacks (CAT-KD's bias-free classifier) stay zero, untrained.
        held = {self.prefix + n: torch.zeros_like(params[self.prefix + n]) for m in self.methods
                for n in m.held_at_zero(self.opt)}
        return {**params, **held, **parts}


class Batch:
    """What a method's terms read of one batch: the run's options and parameters, the images and
    labels, the student's and the teacher's Outputs (`s`, `t`; `t` None without a teacher, `s`
    None in an init step that does not run the student), the images' positions in the training
    set (`index`), the run's global step, epoch and per-run state (`run`: the Objective), and the
    temperature of its logit-matching terms. For the terms of methods that read the cohort's other
    members (Objective.with_peer_terms), `peers` holds them and `s` the student's logits alone."""

    def __init__(self, run, x, y, params, mode, s, t, index):
        self.run, self.opt = run, run.opt
        self.x, self.y, self.params, self.mode, self.s, self.t, self.index = x, y, params, mode, s, t, index
        self.j_s = None
        self.peers = None
        self.x_strong = self.s_strong = self.t_strong = None  # the strong view, for a run that reads it
        self._temperature = None

    @property
    def step(self):
        """Read only by the methods that need it: a compiled forward that read it would be
        recompiled at every step."""
        return self.run.step

    @property
    def epoch(self):
        """The 1-based epoch of the stage; read only by the methods that need it, as `step` (a
        compiled forward that read it would be recompiled at every epoch)."""
        return self.run.epoch

    @property
    def temperature(self):
        """The temperature of the logit-matching terms (KD's, DKD's): the one a method of the run
        learns (Method.temperature), else --temperature; computed once per batch and shared by
        every term that reads it."""
        if self._temperature is None:
            learned = (m.temperature(self) for m in self.run.methods)
            self._temperature = next((t for t in learned if t is not None), self.opt.temperature)
        return self._temperature

    def student_input_gradient(self):
        """J_s = dCE/dx of the student, differentiable (it trains the student: double backprop);
        computed once per batch for every method that reads it."""
        if self.j_s is None:
            self.j_s = input_gradient(self.s.logits, self.y, self.x, create_graph=True)
        return self.j_s

"""What a transfer method declares about itself, and the helpers its declaration uses.

A method is one module of this package with one object `METHOD`, an instance of a `Method`
subclass. Its class attributes say what the method is (its flags, what it reads of the networks,
whether it needs a teacher, where it trains); its methods compute what it adds (learned parts,
loss terms, weights per epoch) and refuse what it cannot do. The engine asks the registry
(methods/__init__.py) and never names a method, so everything about a method is here or in its
own file.
"""
from typing import NamedTuple

import torch

from engine.rules import INTEGER, LOSS_WEIGHT, NUMBER, Rule

KEPT = object()  # a flag without a neutral value: always part of a run's configuration
# RepDistiller's --init_epochs: the init stage of a method that has one.
DEFAULT_INIT_EPOCHS = 30


class Flag:
    """--<name> of one method: its default, the type argparse converts to, the rule a value must
    meet (options.RULES), and its help.

    weight: a loss weight (0: its term is off); summarize.py lists the weights in use. A weight
    flag of a method that needs a teacher is refused without one (needs_teacher).
    forward: what the (compiled) forward reads of it: 'value', 'on' (whether it is non-zero: a
    weight applied outside the forward) or None; members of a cohort that differ in what their
    forward reads get their own compiled functions.
    neutral: the value at which the flag changes nothing, so that summarize.py groups runs that
    leave it there with runs logged before the flag existed (KEPT: always part of the grouping).
    shown: summarize.py shows the setting beside the weights when it is not neutral.
    teacher_only: means nothing without a teacher; summarize.py leaves it out of the grouping of
    runs that learn nothing from theirs."""

    def __init__(self, name, default, help, *, type=float, rule=None, choices=None, weight=False,
                 needs_teacher=False, forward='value', neutral=None, shown=True, teacher_only=False):
        self.name, self.default, self.help, self.type, self.choices = name, default, help, type, choices
        self.rule = rule if rule is not None else LOSS_WEIGHT
        self.weight, self.needs_teacher, self.forward = weight, needs_teacher, forward
        self.neutral = default if neutral is None else neutral
        self.shown, self.teacher_only = shown and not weight, teacher_only

    def add_to(self, parser):
        if self.type is bool:
            parser.add_argument('--' + self.name, action='store_true', help=self.help)
        else:
            parser.add_argument('--' + self.name, default=self.default, type=self.type, choices=self.choices,
                                help=self.help)


def weight(name, help, needs_teacher=True, **kw):
    """A method's loss weight, 0 (off) by default; the rule: 0 or positive."""
    return Flag(name, 0, help, weight=True, needs_teacher=needs_teacher, forward=kw.pop('forward', 'on'), **kw)


def setting(name, default, help, rule, **kw):
    return Flag(name, default, help, type=kw.pop('type', type(default)), rule=rule, **kw)


def positive(what, example, kind=NUMBER):
    return Rule(kind, lambda v: v > 0, 'is not positive', f'use {what} > 0, e.g. {example}')


def at_least_one(accepted, kind=INTEGER):
    return Rule(kind, lambda v: v >= 1, 'is below 1', accepted)


def not_negative(accepted, kind=NUMBER):
    return Rule(kind, lambda v: v >= 0, 'is negative', accepted)


# ----------------------------------------------------------------------------------------------
# Schedules: pure functions of the epoch, so that a resumed run needs nothing but the epoch counter

def step_schedule(value, ratio, epoch, epoch_step):
    """`value` multiplied by `ratio` from each listed epoch on (1-based epochs)."""
    return value * ratio ** sum(epoch >= s for s in epoch_step)


def warmed_up(value, warmup, epoch):
    """mdistiller's warm-up: value * min(epoch / warmup, 1) in 1-based `epoch` (0: none)."""
    return value * min(epoch / warmup, 1.0) if warmup else value


# ----------------------------------------------------------------------------------------------
# What a method reads

class Outputs(NamedTuple):
    """One network's outputs on a batch: what the methods read of it (methods.base.Method.reads);
    what no method of the run reads is None."""
    logits: torch.Tensor
    groups: list
    pooled: torch.Tensor = None
    preact: list = None
    stem: torch.Tensor = None
    feature_map: torch.Tensor = None  # the (B, C, H, W) map whose global average is `pooled`
    input_gradient: torch.Tensor = None


class Nets(NamedTuple):
    """What a method builds its learned parts from and checks a pair by: the student's and the
    teacher's outputs on one blank image (their shapes), the teacher's function (f_t.bn_before_relu
    names the batch norms before its ReLUs), the parameter dict ('teacher.' entries: the teacher's)
    and the training set's labels in dataset order."""
    s: Outputs
    t: Outputs = None
    f_t: object = None
    params: dict = None
    train_labels: torch.Tensor = None


class Peer(NamedTuple):
    """Another member of the cohort on this training step's batch, for a method that reads
    'peers': its options and its logits of this step, detached (computed before any member's
    update)."""
    opt: object
    logits: torch.Tensor


class Reference(NamedTuple):
    """How a reference implementation's own training code runs one benchmark column of a method,
    for the parity harness (benchmarks/parity.py): the codebase, the flags of its training script
    (templates of our options, or functions of the options and the pair's Nets where the reference
    is told the networks' shapes), and its names of the method's learned parts, as (regular
    expression over our 'aux.' name, replacement: a template or a function of the match) pairs.
    RepDistiller's names live in the namespace {'module_list': ..., 'criterion_list': ...} of its
    train_student.py's main stage (`parts`) and {'module_list': [student], 'init_modules': ...,
    'criterion': ...} of its init stage (`init_parts`); `init`: the column trains an init stage
    first; `ours`: flags of this suite that reproduce the reference where its default differs on
    purpose."""
    code: str
    argv: tuple
    parts: tuple = ()
    init: bool = False
    init_parts: tuple = ()
    ours: tuple = ()  # flags this suite adds to the column's to train as the reference does


# ----------------------------------------------------------------------------------------------
# The method

class Method:
    """Everything about one transfer method. Subclasses set the attributes and override the
    methods their method needs; the defaults describe a method with one weight flag (the first of
    `flags`) and one term, or one term per group, in the main stage."""

    name = ''  # its terms' kind (a per-group term adds the group's number) and its loss weight's key
    title = ''  # how tables and documents name it
    order = 0  # its place among the methods: flags, terms and weights come in this order
    flags = ()  # its weight first, then its settings
    teacher = True  # it compares the student with a teacher (its weights need one)
    # What it reads of the networks besides logits and groups: 'pooled' (the feature the classifier
    # reads), 'preact' (the groups before their ReLUs, and the pooled feature), 'stem' (the output
    # of the layers before the first group, and all of the above), 'feature_map' (the map whose global
    # average the classifier reads, and all of the above), 'input_gradient'
    # (the student's, differentiated twice), 'teacher_input_gradient', 'peers' (the logits of the
    # cohort's other members on the same batch, as Peer: its terms are computed in training steps
    # once every member's forward has run, outside the compiled forward, from the student's logits
    # alone), 'strong_view' (in training steps, a strongly augmented second view of the batch,
    # datasets/strong_view.py: its images and both networks' Outputs on it, Batch.x_strong, s_strong,
    # t_strong; the loader makes it for the runs that read it, cifar.py only).
    reads = ()
    per_group = False  # one term per group pair
    training_only = False  # its terms are left out of evaluation
    init_stage = None  # None; 'trains' the student in an init stage; 'parts' prepares its own parts there
    init_only = False  # its term exists only in the init stage
    buffers = ()  # entries of its learned parts updated without the optimizer (last name component)
    compiles = True  # its forward can run compiled
    own_forward = False  # its forward reads its run's seed and step: no sharing with other members
    examples = {}  # {label: member options}: its usual settings, as the cost benchmark times them
    references = {}  # {benchmark column: Reference}: the reference's training of that column (parity)

    # -- what is on ------------------------------------------------------------------------------

    @property
    def weight(self):
        return self.flags[0].name

    def active(self, o, has_teacher):
        """Whether a run with options `o` computes this method's terms."""
        return bool(getattr(o, self.weight)) and (has_teacher or not self.teacher)

    def refuse(self, o, context):
        """Raises a UserError for options of this method that cannot train together; `context` says
        whether the run has a teacher and runs under torchrun (options.check_transfer_options)."""

    def refuse_members(self, o, others):
        """Raises a UserError if a run with options `o` cannot train beside the other members of its
        cohort (`others`, their options; None: a single run), before anything is written
        (cohort.member_runs)."""

    def teacher_trains(self, o):
        """Whether a run with options `o` runs its teacher in training mode (batch statistics, its
        running statistics moving), as a reference does; the teacher is never trained by gradient."""
        return False

    # -- learned parts ---------------------------------------------------------------------------

    def refuse_pair(self, o, nets):
        """Raises a UserError if this method cannot compare the networks of `nets` (Nets)."""

    def parts(self, o, nets, run):
        """{name: tensor or nested dict} of its learned parts under 'aux.', built from `nets`
        (the networks' outputs on one blank image); refuses a pair it cannot compare."""
        return {}

    def held_at_zero(self, o):
        """Names of the student's tensors ('fc.bias') that a run with options `o` holds at zero,
        untrained: what the network its reference trains does not have."""
        return ()

    # -- loss terms ------------------------------------------------------------------------------

    def term_names(self, o, run, stage):
        """The names of the terms it computes in `stage`, in order; `run` (the objective) knows the
        networks' number of groups and whether there is a teacher."""
        if stage != 'main' or self.init_only:
            return []
        return [f'{self.name}{g}' for g in range(run.n_groups)] if self.per_group else [self.name]

    def terms(self, b):
        """{term: unweighted value} of the main stage for batch `b` (objective.Batch), named as
        term_names says."""
        return {}

    def init_terms(self, b):
        return {}

    def temperature(self, b):
        """The temperature it learns for the run's logit-matching terms on batch `b` (as a tensor
        that carries the gradient it wants), or None: they then take --temperature. The terms read
        it as b.temperature (objective.Batch)."""
        return None

    def uses_temperature(self, o):
        """Whether a run with options `o` computes terms at b.temperature."""
        return False

    def weights(self, o, epoch, epoch_step, stage):
        """{kind: weight} in 1-based `epoch` of `stage`."""
        return {self.name: getattr(o, self.weight)}

    # -- how its member steps --------------------------------------------------------------------

    def optimizer(self, o, trainable):
        """The optimizer of a run with options `o` over its `trainable` tensors, for a method that
        changes how its member steps, or None: the suite's SGD (momentum 0.9, --lr, --weight_decay).
        An optimizer with a method backward(weighted, scale) takes each training step's backward
        itself: `weighted` the step's weighted terms by name, each to be multiplied by `scale` (the
        process's share of the batch) before it is differentiated (methods/dot.py)."""
        return None

    # -- benchmarks ------------------------------------------------------------------------------

    def columns(self, table, teacher, student):
        """{column: member options} of this method in the benchmark `table`, 'table1' (the AT paper's
        Table 1, scripts/table1.sh) or 'crd' (the CRD paper's, scripts/crd_table.sh), for the pair of
        teacher and student (RepDistiller's network names), with that pair's settings. The registry
        leaves out the columns of a pair that the method refuses (refuse_pair)."""
        return {}

    def for_training_set(self, options, n_train):
        """`options` of one of its members, fitted to a training set of n_train images."""
        return options

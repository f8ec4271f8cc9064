"""The transfer methods, one module each, and the registry through which the rest of the suite
learns about them.

A method is a module of this package that defines `METHOD` (a methods.base.Method): its flags,
what it reads of the networks, its learned parts, its terms per stage, its weights per epoch,
what it refuses, how tables name it and its settings per benchmark pair. Adding a module adds the
method to both scripts' command lines, to cohorts, to summarize.py and to the benchmark columns;
nothing outside this package names it. `all_methods()` lists them in the order of their
`order`: the order of their terms, and of their flags and weights after those the suite had before
its methods had files of their own (FLAG_ORDER, WEIGHT_ORDER).

    python3 -m methods                 # every method: its flags and what it reads
"""
import argparse
import functools
import importlib
import pkgutil

from engine.errors import UserError
from engine.rules import OPTIONAL_INTEGER, OPTIONAL_NUMBER, Rule
from methods.base import DEFAULT_INIT_EPOCHS, KEPT, Flag, Nets, Outputs


@functools.cache
def all_methods():
    """Every method of this package, in their fixed order. Found, not listed: a new module is a
    new method. Imported on first use, so that utils.py may take the paper's losses from here."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith('_'):
            continue
        method = getattr(importlib.import_module(f'{__name__}.{module.name}'), 'METHOD', None)
        if method is not None:
            found.append(method)
    return tuple(sorted(found, key=lambda m: m.order))


# The order of the flags of the methods and their init stage, and so of those options in every
# log line, as it was before each method had a file of its own: kept, so that log lines keep their
# key order. The flags of later methods follow, in the methods' order.
FLAG_ORDER = (
    'temperature', 'alpha', 'beta', 'at_p', 'at_form', 'beta_decay', 'grad_beta', 'sym_beta', 'factt_beta',
    'fitnet_beta', 'cos_beta', 'aux_weight', 'sp_beta', 'fitnet_regressor', 'cc_beta', 'cc_dim', 'rkd_beta',
    'rkd_w_d', 'rkd_w_a', 'pkt_beta', 'nst_beta', 'kdsvd_beta', 'kdsvd_k', 'fsp_beta', 'vid_beta', 'dkd_beta',
    'dkd_alpha', 'dkd_nckd', 'dkd_warmup', 'logit_stand', 'kd_beta', 'crd_beta', 'crd_feat_dim', 'crd_nce_k',
    'crd_nce_t', 'crd_nce_m', 'reviewkd_beta', 'reviewkd_warmup', 'reviewkd_mid_channels', 'ab_beta', 'ft_beta',
    'ft_rate', 'init_epochs', 'init_lr', 'ofd_beta')
# Likewise the order of the kinds of terms in a log line's loss_weights.
WEIGHT_ORDER = ('cross_entropy', 'distillation', 'at', 'grad_at', 'symmetry', 'factt', 'fitnet', 'cos', 'aux', 'sp',
                'cc', 'rkd', 'pkt', 'nst', 'kdsvd', 'fsp', 'vid', 'dkd', 'reviewkd', 'kd', 'crd', 'ab', 'ft', 'ofd',
                'reconstruction')


def teacher_trains(o):
    """Whether a run with options `o` runs its teacher in training mode (Method.teacher_trains)."""
    return any(m.teacher_trains(o) for m in all_methods())


def in_order(names, order, later=()):
    """`names` in the order of `order`, then those it lacks in the order of `later`."""
    later = list(later)
    return sorted(names, key=lambda n: (0, order.index(n)) if n in order else (1, later.index(n)))


@functools.cache
def flags():
    """Every method's flags and those of the init stage, in command-line order."""
    declared = [f for m in all_methods() for f in m.flags] + list(stage_flags())
    by_name = {f.name: f for f in declared}
    return [by_name[n] for n in in_order(by_name, FLAG_ORDER, by_name)]


@functools.cache
def stage_flags():
    """The flags of the init stage in which some methods train before the main one."""
    titles = [m.title for m in with_init_stage()]
    names = ', '.join(titles[:-1]) + f' and {titles[-1]}' if len(titles) > 1 else ''.join(titles)
    return (
        Flag('init_epochs', None, f'epochs of the init stage that {names} train before the main stage (default: '
                                  f'{DEFAULT_INIT_EPOCHS} with one of them, as RepDistiller, else 0; a method that '
                                  f'trains there with 0 is a main-stage term)',
             type=int, neutral=0,
             rule=Rule(OPTIONAL_INTEGER, lambda v: v is None or v >= 0, 'is negative',
                       f'use the epochs of the init stage, e.g. {DEFAULT_INIT_EPOCHS}, 0 for none, or leave '
                       f'--init_epochs out')),
        Flag('init_lr', None, 'constant learning rate of the init stage (default: --lr; RepDistiller uses 0.01 for '
                              'FT with ResNet and WRN students)',
             forward=None, shown=False,
             rule=Rule(OPTIONAL_NUMBER, lambda v: v is None or v > 0, 'is not positive',
                       "use a learning rate > 0, e.g. 0.01 (RepDistiller's for FT), or leave --init_lr out for "
                       "--lr")),
    )


def add_arguments(parser):
    for f in flags():
        f.add_to(parser)


def rules():
    """{flag: its rule} of every method's flags (options.RULES)."""
    return {f.name: f.rule for f in flags()}


def weight_flags():
    return [f.name for f in flags() if f.weight]


def teacher_weights():
    """The weights of the terms that learn from a teacher: a run whose are all 0 learns what a
    run without a teacher learns."""
    return [f.name for m in all_methods() if m.teacher for f in m.flags if f.weight]


def neutral():
    """{flag: the value at which it changes nothing} (summarize.py)."""
    return {f.name: f.neutral for f in flags() if f.neutral is not KEPT}


def shown_settings():
    """The settings a table shows beside the weights when they are not neutral."""
    return [f.name for f in flags() if f.shown and f.neutral is not KEPT]


def teacher_only():
    return [f.name for f in flags() if f.teacher_only]


def with_init_stage():
    """The methods that train (or prepare their parts) in an init stage."""
    return [m for m in all_methods() if m.init_stage]


def on(o, method):
    """Whether the options `o` switch `method`'s weight on (with or without a teacher)."""
    return bool(getattr(o, method.weight))


def double_backward(o):
    """Whether a run differentiates its student's input gradient: double backprop."""
    return any(on(o, m) for m in all_methods() if 'input_gradient' in m.reads)


def optimizer(o, trainable):
    """The optimizer a method of the run asks for (Method.optimizer), or None."""
    return next((opt for m in all_methods() if on(o, m) for opt in [m.optimizer(o, trainable)] if opt is not None),
                None)


def strong_view(o):
    """Whether a run with options `o` reads a strongly augmented second view of each training batch."""
    return any(on(o, m) for m in all_methods() if 'strong_view' in m.reads)


def defaults():
    return argparse.Namespace(**{f.name: f.default for f in flags()})


# ----------------------------------------------------------------------------------------------
# The benchmark's columns

TABLES = ('table1', 'crd')


def columns(table, teacher, student, nets):
    """{column: member options} of every method in the benchmark `table` (Method.columns) for the
    pair (RepDistiller's network names), with the pair's settings, leaving out the columns whose
    method refuses the pair; `nets` is the pair's networks run on a blank image (Nets)."""
    found = {}
    for m in all_methods():
        for column, options in m.columns(table, teacher, student).items():
            try:
                m.refuse_pair(argparse.Namespace(**{**vars(defaults()), **options}), nets)
            except UserError:  # the run would stop with it
                continue
            found[column] = options
    return found


def references():
    """{benchmark column: Reference} of every method whose reference implementation the parity
    harness (benchmarks/parity.py) trains beside this suite, in the methods' order."""
    return {column: ref for m in all_methods() for column, ref in m.references.items()}


def probe(teacher, student, num_classes=100, image_size=32):
    """Nets of a pair of the zoo's networks (RepDistiller's names), run on a blank image as a run
    builds them."""
    import torch

    from models import zoo
    f_s, p_s = zoo.network(student, num_classes)
    f_t, p_t = zoo.network(teacher, num_classes)
    x = torch.zeros(1, 3, image_size, image_size)
    with torch.no_grad():
        s, t = Outputs(*f_s(x, p_s, False, feature_map=True)), Outputs(*f_t(x, p_t, False, feature_map=True))
    return Nets(s, t, f_t, {'teacher.' + k: v for k, v in p_t.items()})


def cohort(table, teacher, student, seeds):
    """The --cohort members of the pair's row in the benchmark `table`: the student alone (it has
    the teacher but gives it no weight), then every method's columns, each over `seeds`, named
    <column>_seed<k>."""
    row = {'student': {}, **columns(table, teacher, student, probe(teacher, student))}
    return [{'name': f'{column}_seed{seed}', 'seed': seed, **options}
            for column, options in row.items() for seed in seeds]


def for_training_set(options, n_train):
    """A member's options fitted to a training set of n_train images by every method."""
    for m in all_methods():
        options = m.for_training_set(options, n_train)
    return options

"""Results of many runs as one Markdown table (the paper's Table 1 shape) and test-error curves.

    python summarize.py logs/*                         # one row per configuration
    python summarize.py logs --plot test_error.png     # every run under logs/, plus curves

Runs that differ only in --seed, --save and other options that do not change what is learned
(paths, threads, devices, the cohort a run was trained in) form one configuration; its row gives
the median and min-max range of the final test error over those runs, as the paper reports medians over seeds. Reads the
log.txt of this code and of the original code (CIFAR and ImageNet), and of runs still going.
"""
import argparse
import json
import math
import os
import statistics
import sys

import methods
from engine.checkpoint import CHECKPOINT, LOG, LOG_PREFIX, log_records
from engine.errors import UserError
from engine.stopping import reports_user_errors

# Options that say where or how fast a run ran, not what it learned.
NOT_CONFIGURATION = {'seed', 'data_seed', 'save', 'resume', 'cohort', 'dataroot', 'data_root',
                     'imagenetpath', 'nthread', 'gpu_id', 'ngpu', 'cuda', 'compile', 'compile_mode',
                     'deterministic', 'precision', 'tensorboard', 'tensorboard_every', 'param_table'}
# Fields a log line adds to the options (num_classes stays: it tells ImageNet subsets apart).
# The training precision (autocast) does not split a configuration either: under --precision
# auto the same command trains in bf16 on one machine and in fp32 on another, and a row's
# seeds may come from both; each run's log line still says which it was.
PER_EPOCH = {'train_loss', 'train_acc', 'test_loss', 'test_acc', 'epoch', 'n_parameters',
             'train_time', 'test_time', 'at_losses', 'loss_weights', 'gpu_memory_mib', 'autocast',
             'n_train', 'n_test', 'stage'}
# Options at these values do what the code did before they existed: runs logged before the
# options existed, and runs that leave them alone, are one configuration. The transfer methods say
# which of their flags are neutral where (methods.base.Flag.neutral).
NEUTRAL = {'arch': 'wrn', 'crop_padding': 'reflect', 'normalization': 'cifar10', 'teacher_arch': '',
           'teacher_params': '', 'train_per_class': 0, 'test_per_class': 0, 'student_params': '', 'init': 'auto',
           'augment': 'on', 'momentum_at_decay': 'restart', **methods.neutral()}
# The methods' settings shown beside the weights when changed.
METHOD_SETTINGS = tuple(methods.shown_settings())
# The weights of the terms that compare the student with its teacher.
TEACHER_WEIGHTS = tuple(methods.teacher_weights())
# What means nothing without a teacher: left out of the configuration of a run that learns nothing from one.
TEACHER_ONLY = ('teacher_id', 'teacher_params', *methods.teacher_only())
FIGURE_TYPES = ('.png', '.pdf', '.svg')
# The original code spelled these options differently; its runs group with ours.
ORIGINAL_NAMES = {'batchSize': 'batch_size', 'weightDecay': 'weight_decay'}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Markdown table and curves of training runs')
    p.add_argument('runs', nargs='+', metavar='RUN_DIR',
                   help='run directories (holding log.txt), or folders of them such as logs/')
    p.add_argument('--plot', default='', metavar='FILE.png', help='draw test error against epoch')
    p.add_argument('--log_scale', action='store_true', help='logarithmic test-error axis')
    p.add_argument('--paired', default='', metavar='RUN[,RUN]',
                   help='also a table of every run against these runs (named by their folder, as a '
                        "cohort's members are): the gain is their final error minus the run's")
    opt = p.parse_args(argv)
    if opt.plot and os.path.splitext(opt.plot)[1].lower() not in FIGURE_TYPES:
        raise UserError(f'--plot {opt.plot}: name a {", ".join(FIGURE_TYPES)} file')
    if opt.plot and not os.path.isdir(os.path.dirname(opt.plot) or '.'):
        raise UserError(f'--plot {opt.plot}: folder {os.path.dirname(opt.plot)} does not exist; '
                        f'create it first')
    return opt


def find_run_dirs(paths):
    """Each path is a run (it holds log.txt) or a folder searched for runs below it."""
    found = []
    for path in paths:
        if os.path.isfile(path) and os.path.basename(path) == LOG:
            path = os.path.dirname(path) or '.'
        if not os.path.isdir(path):
            raise UserError(f'{path} is not a directory; pass run directories (with {LOG}) or logs/')
        if os.path.isfile(os.path.join(path, LOG)):
            found.append(path)
            continue
        below = sorted(root for root, _, files in os.walk(path) if LOG in files)
        if not below:
            raise UserError(f'no {LOG} in {path} or below it; is it a run directory?')
        found += below
    return list(dict.fromkeys(found))


def read_records(run_dir):
    """The json_stats records of a run's main stage, one per epoch (the latest line wins when a
    resumed run repeated epochs); the lines of an init stage ("stage": "init") are not its
    results. A torn last line is left out, as every reader of logs does
    (checkpoint.log_records)."""
    path = os.path.join(run_dir, LOG)
    by_epoch = {}
    for record in log_records(path):
        if 'epoch' not in record or 'test_acc' not in record:
            raise UserError(f'{path}: a json_stats line lacks epoch or test_acc; not a training log')
        if record.get('stage', 'main') == 'main':
            by_epoch[record['epoch']] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def why_no_records(run_dir):
    """Why a run's log.txt gives no epoch: a run of this suite that has not finished one yet (its
    checkpoint is there, or its log is empty), or a file some other program wrote."""
    path = os.path.join(run_dir, LOG)
    with open(path, 'rb') as f:
        head = f.read(4096)
    if os.path.isfile(os.path.join(run_dir, CHECKPOINT)):
        return 'no epoch finished yet'
    if not head.strip():
        return f'{path} is empty: not a log of this suite, and no checkpoint beside it'
    if head.decode(errors='replace').lstrip().startswith('{'):
        return f'{path} is not a log of this suite: its lines are JSON without the {LOG_PREFIX.strip()!r} prefix'
    if b'\0' in head:
        return f'{path} is not a log of this suite: it is a binary file'
    return f'{path} is not a log of this suite: it has no {LOG_PREFIX.strip()!r} line'


def is_nan(value):
    return isinstance(value, float) and math.isnan(value)


def top1(acc):
    """The original ImageNet code logged [top-1, top-5] accuracy."""
    return acc[0] if isinstance(acc, list) else acc


def learns_from_teacher(o):
    """Whether a run's loss uses its teacher: a cohort's 'student alone' member has one, but all
    of its transfer weights are 0, so it learns what a run without a teacher learns."""
    return any(isinstance(o.get(k), (int, float)) and o[k] for k in TEACHER_WEIGHTS)


def configuration(record):
    options = {ORIGINAL_NAMES.get(k, k): v for k, v in record.items()
               if k not in NOT_CONFIGURATION and k not in PER_EPOCH
               and not k.startswith(('train_', 'test_')) and not k.endswith(('_loss', '_losses'))
               and not (k in NEUTRAL and v == NEUTRAL[k])
               and not (k in TEACHER_ONLY and not learns_from_teacher(record))}
    return json.dumps(options, sort_keys=True)


def describe_run(run_dir, records):
    last = records[-1]
    return {'dir': run_dir, 'options': last, 'config': configuration(last),
            'epochs': [r['epoch'] for r in records],
            'errors': [100 - top1(r['test_acc']) for r in records],
            'epoch_times': [r.get('train_time', math.nan) + r.get('test_time', 0) for r in records],
            'finished': last['epoch'] >= last.get('epochs', 0)}


def student_name(o):
    if 'imagenetpath' in o:
        return f'ResNet-{o.get("depth", "?")}' + (f' x{o["width"]:g}' if o.get('width', 1) != 1 else '')
    if o.get('arch', 'wrn') != 'wrn':  # a network of the CRD benchmark, by its name there
        return o['arch']
    return f'WRN-{o.get("depth", "?")}-{o.get("width", 1):g}'


def teacher_name(o):
    if not learns_from_teacher(o):
        return '-'
    if o.get('teacher_id'):
        return o['teacher_id']
    if o.get('teacher_arch'):  # RepDistiller's files are all ckpt_epoch_240.pth: name the network
        return f'{o["teacher_arch"]} (RepDistiller)'
    if o.get('teacher_params'):
        return os.path.basename(o['teacher_params'])
    return '-'


def method_weights(o):
    """The loss weights of the transfer methods in use (those every run has first: the paper's
    alpha and beta; then the others by name), then their settings that are not neutral."""
    weights = methods.weight_flags()
    names = [k for k in weights if k not in NEUTRAL] + sorted(k for k in weights if k in NEUTRAL)
    shown = [f'{k} {o[k]:g}' for k in names if isinstance(o.get(k), (int, float)) and o[k]]
    shown += [f'{k} {o[k]:g}' if isinstance(o[k], float) else f'{k} {o[k]}'
              for k in METHOD_SETTINGS if k in o and o[k] != NEUTRAL[k]]
    return ', '.join(shown) or '-'


def data_name(o):
    if 'imagenetpath' not in o:
        subset = [f'{o[k]} {k.split("_")[0]}' for k in ('train_per_class', 'test_per_class') if o.get(k)]
        return o.get('dataset', '?') + (f' ({", ".join(subset)} images/class)' if subset else '')
    return 'ImageNet' + (f' ({o["num_classes"]} classes)' if o.get('num_classes', 1000) != 1000 else '')


def group_runs(runs):
    """Runs of one configuration together, configurations in a stable, readable order."""
    groups = {}
    for run in runs:
        groups.setdefault(run['config'], []).append(run)
    return sorted(groups.values(), key=lambda g: (data_name(g[0]['options']), student_name(g[0]['options']),
                                                  teacher_name(g[0]['options']), g[0]['config']))


def looks(group):
    """What a row shows of its configuration in the named columns."""
    o = group[0]['options']
    return student_name(o), teacher_name(o), method_weights(o), data_name(o), o.get('epochs')


def distinguishing_options(groups):
    """Per row, 'option=value' for each option that sets it apart from a row that looks the
    same in the named columns (e.g. two learning rates), '-' where the option is absent."""
    configs = [json.loads(g[0]['config']) for g in groups]
    shown = []
    for i, config in enumerate(configs):
        twins = [c for j, c in enumerate(configs) if j != i and looks(groups[j]) == looks(groups[i])]
        keys = sorted({k for twin in twins for k in config.keys() | twin.keys()
                       if config.get(k) != twin.get(k)})
        shown.append(', '.join(f'{k}={plain(config[k]) if k in config else "-"}' for k in keys))
    return shown


def plain(value):
    return value if isinstance(value, str) else json.dumps(value)


def fmt(x):
    return f'{x:.2f}'


def fmt_time(seconds):
    if math.isnan(seconds):
        return '-'
    return f'{seconds:.1f} s' if seconds < 100 else f'{seconds:.0f} s'


def table_row(group):
    """The named columns of one configuration. Its final error is taken over its finished runs,
    or over the latest epoch of unfinished ones while none has finished."""
    o = group[0]['options']
    finished = [run for run in group if run['finished']]
    unfinished = len(group) - len(finished)
    finals = [run['errors'][-1] for run in finished or group]
    done = min(run['epochs'][-1] for run in group)
    times = [t for run in group for t in run['epoch_times'] if not math.isnan(t)]
    return [student_name(o), teacher_name(o), method_weights(o), data_name(o),
            f'{len(group)}' + (f' ({unfinished} unfinished)' if unfinished else ''),
            fmt(statistics.median(finals)),
            f'{fmt(min(finals))}-{fmt(max(finals))}' if len(finals) > 1 else '-',
            fmt(min(e for run in group for e in run['errors'])),
            f'{o.get("epochs", "?")}' + (f' ({done} done)' if unfinished else ''),
            fmt_time(statistics.median(times) if times else math.nan)]


def markdown_table(groups):
    header = ['student', 'teacher', 'weights', 'data', 'runs', 'final error %', 'range',
              'best error %', 'epochs', 'time/epoch']
    rows = [table_row(g) for g in groups]
    extra = distinguishing_options(groups)
    if any(extra):
        header.append('differs in')
        rows = [row + [e] for row, e in zip(rows, extra)]
    lines = ['| ' + ' | '.join(r) + ' |' for r in [header, ['---'] * len(header)] + rows]
    lines += ['', 'final error %: median of 100 - test_acc at the last epoch over the finished runs '
              '(over the unfinished ones while none has finished); range: min-max of those; best '
              'error %: lowest test error of any run at any epoch; unfinished: fewer epochs logged '
              'than --epochs (still running, or stopped); time/epoch: median train + test seconds.']
    return '\n'.join(lines)


def paired_table(runs, names):
    """Every run against the runs named (a cohort's members by folder name: same seed, so the
    same initial weights and batches), sorted by final error. Positive gains are better."""
    by_name = {}
    for run in runs:
        by_name.setdefault(os.path.basename(os.path.normpath(run['dir'])), []).append(run)
    for name in names:
        if name not in by_name:
            raise UserError(f'--paired {name}: no run folder of that name among the runs given '
                            f'(there are: {", ".join(sorted(by_name))})')
        if len(by_name[name]) > 1:
            raise UserError(f'--paired {name}: {len(by_name[name])} runs have that folder name '
                            f'({", ".join(r["dir"] for r in by_name[name])}); pass one cohort')
    bases = [by_name[name][0] for name in names]
    network, lr = student_name(bases[0]['options']), bases[0]['options'].get('lr')
    # Another network (a teacher's log beside its students) shares neither weights nor a step.
    others = [r for r in runs if student_name(r['options']) != network]
    header = (['run', 'weights', 'seed', 'final error %']
              + [f'gain over {name}' for name in names] + ['best error %'])
    ordered = sorted((r for r in runs if student_name(r['options']) == network), key=lambda r: r['errors'][-1])
    rows = []
    for run in ordered:
        final = run['errors'][-1]
        gains = ['-' if base is run else f'{base["errors"][-1] - final:+.2f}' for base in bases]
        o = run['options']
        weights = method_weights(o) + (f', lr {o["lr"]}' if o.get('lr') != lr else '')
        rows.append([os.path.basename(os.path.normpath(run['dir'])), weights,
                     str(o.get('seed', '-')), fmt(final), *gains, fmt(min(run['errors']))])
    lines = ['| ' + ' | '.join(r) + ' |' for r in [header, ['---'] * len(header)] + rows]
    unfinished = [row[0] for row, run in zip(rows, ordered) if not run['finished']]
    if unfinished:
        lines += ['', f'unfinished (their latest epoch): {", ".join(unfinished)}']
    if others:
        lines += ['', f'not paired (not a {network}): '
                  + ', '.join(os.path.basename(os.path.normpath(r['dir'])) for r in others)]
    return '\n'.join(lines)


def legend_label(group, distinction):
    o = group[0]['options']
    teacher, weights = teacher_name(o), method_weights(o)
    label = student_name(o) + ('' if teacher == '-' else f' <- {teacher}')
    label += ''.join(f', {part}' for part in (weights, distinction) if part and part != '-')
    return label + f' ({len(group)} run{"s" if len(group) > 1 else ""})'


def plot_curves(groups, out, log_scale):
    import matplotlib
    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap('tab10').colors
    for i, (group, distinction) in enumerate(zip(groups, distinguishing_options(groups))):
        for j, run in enumerate(group):
            ax.plot(run['epochs'], run['errors'], color=colours[i % len(colours)], linewidth=1.2,
                    alpha=0.8, marker='.' if len(run['epochs']) < 20 else None,
                    label=legend_label(group, distinction) if j == 0 else None)
    if log_scale:
        ax.set_yscale('log')
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format(FuncFormatter(lambda v, _: f'{v:g}'))  # 20, not 2x10^1
    ax.set_xlabel('epoch')
    ax.set_ylabel('test error, %')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UserError(f'cannot write --plot {out} ({e}); pick a writable path') from None
    plt.close(fig)


@reports_user_errors
def main(argv=None):
    opt = parse_args(argv)
    runs, damaged = [], []
    for run_dir in find_run_dirs(opt.runs):
        try:
            records = read_records(run_dir)
        except UserError as e:
            damaged.append((run_dir, e))  # one damaged log should not hide the table of the others
            continue
        if not records:
            print(f'{os.path.basename(sys.argv[0])}: warning: {run_dir}: {why_no_records(run_dir)}, left out',
                  file=sys.stderr)
            continue
        diverged = [r['epoch'] for r in records if is_nan(top1(r['test_acc']))]
        if diverged:  # one such run would make its configuration's median NaN
            print(f'{os.path.basename(sys.argv[0])}: warning: {run_dir}: its test accuracy is NaN at epoch '
                  f'{diverged[0]} (the run diverged), left out', file=sys.stderr)
            continue
        runs.append(describe_run(run_dir, records))
    if not runs and damaged:
        raise damaged[0][1] if len(damaged) == 1 else UserError(
            f'no run could be read: {"; ".join(str(e) for _, e in damaged)}')
    if not runs:
        raise UserError('none of the runs has a finished epoch to show; nothing to summarise')
    for run_dir, e in damaged:
        print(f'{os.path.basename(sys.argv[0])}: warning: {e}; {run_dir} left out', file=sys.stderr)
    groups = group_runs(runs)
    print(markdown_table(groups))
    if opt.paired:
        print()
        print(paired_table(runs, [n for n in opt.paired.split(',') if n]))
    if opt.plot:
        plot_curves(groups, opt.plot, opt.log_scale)
        print(f'\ntest error curves written to {opt.plot}')


if __name__ == '__main__':
    main()

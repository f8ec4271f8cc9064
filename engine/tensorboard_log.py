"""Live curves: each run's scalars as TensorBoard event files in <run dir>/tb/, beside log.txt.

    tensorboard --logdir logs      # every run under logs/ (each cohort member too), side by side

log.txt stays the record; the event files let a long run be watched while it trains. After each
epoch they get the numbers of its log line (train and test loss and accuracy, top-k, each loss
term's mean, the epoch's times) with the learning rate and each loss weight; every
--tensorboard_every steps, the loss of that training step.

Every point's step is the global training step (the iteration), epoch points at the epoch's
last step, so all curves share one axis and a resumed run can say where it continues: it opens
its file with purge_step one past the step of its checkpoint. TensorBoard's Python reader then
discards every later point an interrupted run had written (the START record at purge_step),
and its Rust reader discards a tag's later points when the resumed run writes that tag again
(its steps go back). Epochs before the checkpoint are never run again, so never written again.
"""
import importlib.util
import os

import torch
from ignite.engine import Events

TB_DIR = 'tb'
CHOICES = ['auto', 'on', 'off']


def available():
    """Whether the tensorboard package is installed; finding it imports nothing."""
    return importlib.util.find_spec('tensorboard') is not None


def epoch_scalars(stats, lr):
    """{tag: value} of one epoch's log line: 'train_loss' is train/loss (a field's first
    underscore becomes a slash, so TensorBoard groups train/ and test/), each term's mean is
    terms/<field> (per-group terms terms/<field>/<group>), the schedule is schedule/lr and
    schedule/<kind>_weight; those of an init stage's epochs (AB, FT, FSP) start with init/."""
    scalars = {}
    for field, value in stats.items():
        if field.startswith(('train_', 'test_')) and is_number(value):
            scalars[field.replace('_', '/', 1)] = value
        elif field.endswith('_loss') and isinstance(value, list) and value and is_number(value[0]):
            scalars[f'terms/{field}'] = value[0]  # [mean, std] over the epoch's batches
        elif field.endswith('_losses') and isinstance(value, list):
            scalars.update({f'terms/{field}/{g}': v[0] for g, v in enumerate(value) if is_number(v[0])})
    scalars['schedule/lr'] = lr
    scalars.update({f'schedule/{kind}_weight': w for kind, w in stats.get('loss_weights', {}).items()})
    if stats.get('stage') == 'init':  # an init stage's epochs get curves of their own: init/train/loss, ...
        return {f'init/{tag}': v for tag, v in scalars.items()}
    return scalars


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunCurves:
    """One run's event file in <run dir>/tb/, opened when training starts (a refused run never
    gets that far): it begins with the step after the one the run resumes from."""

    def __init__(self, run_dir, resumed_step):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used
        self.writer = SummaryWriter(os.path.join(run_dir, TB_DIR), purge_step=resumed_step + 1, flush_secs=30)

    def add(self, scalars, step):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class Curves:
    """Every member's RunCurves (none on ranks other than 0, or with --tensorboard off); closes
    them all when its `with` ends, however training ends."""

    def __init__(self, runs):
        self.runs = runs

    def epoch(self, member, stats, lr, step):
        if member in self.runs:
            self.runs[member].add(epoch_scalars(stats, lr), step)
            self.runs[member].flush()  # with the log line: what the JSON says, TensorBoard shows

    def step_losses(self, engine):
        outputs = {m: o for m, o in engine.state.output.items() if m in self.runs}
        if outputs:
            # One host sync for every run of the step, and only every --tensorboard_every steps.
            losses = torch.stack([o['loss'].float() for o in outputs.values()]).tolist()
            for m, loss in zip(outputs, losses):
                self.runs[m].add({'train/step_loss': loss}, m.own(engine.state.iteration))  # its own timeline

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for run in self.runs.values():
            run.close()


def attach(trainer, members, opt, main):
    """The Curves of this command's runs, writing each step loss every --tensorboard_every steps
    through `trainer`. Under torchrun only rank 0 writes; the step loss it writes is that of its
    slice of the batch (the epoch points are the whole batch's, as in log.txt)."""
    if not main or opt.tensorboard == 'off':
        return Curves({})
    if not available():  # --tensorboard on without the package was refused with the options
        print(f'tensorboard is not installed: no live curves in {os.path.join(opt.save, TB_DIR)} '
              f'(pip install tensorboard, or pass --tensorboard off)', flush=True)
        return Curves({})
    curves = Curves({m: RunCurves(m.opt.save, m.start_iteration) for m in members})
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=opt.tensorboard_every), curves.step_losses)
    return curves

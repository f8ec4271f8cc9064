"""Step-for-step parity of a transfer method with its reference implementation.

    python3 benchmarks/parity.py --reference ~/RepDistiller --method all
    python3 benchmarks/parity.py --reference ~/RepDistiller --method vid --steps 8
    python3 benchmarks/parity.py --reference ~/RepDistiller --method all --record tests/fixtures/parity
    python3 benchmarks/parity.py --reference ~/mdistiller --method all      # its methods (DKD)
    python3 benchmarks/parity.py --reference ~/logit-standardization-KD --method kd_ls  # KD+LS, its authors'
    python3 benchmarks/parity.py --reference ~/torchdistill --method dist   # DIST
    python3 benchmarks/parity.py --reference ~/SDD-CVPR2024 --method all    # SDD-DKD, SDD-KD: a fork of mdistiller
    python3 benchmarks/parity.py --reference ~/CAT-KD --method catkd        # CAT-KD: a fork of mdistiller
    python3 benchmarks/parity.py --reference ~/CTKD --method all            # CTKD, a fork of RepDistiller
    python3 benchmarks/parity.py --reference ~/Multi-Level-Logit-Distillation --method mlkd  # MLKD, its authors'
    python3 benchmarks/parity.py --reference ~/TTM --method wttm            # WTTM, a fork of RepDistiller
    python3 benchmarks/parity.py --reference ~/cls_KD --method nkd          # NKD, its authors' loss

Both sides start from the same weights and see the same batches, in fp64:

- the student and the teacher (CIFAR networks of the CRD benchmark, RepDistiller's initialisation)
  are drawn here from a seed and saved as RepDistiller checkpoints; the reference loads them as
  its own, this suite through --student_params and --teacher_params;
- the method's learned parts are built by both sides, and the reference's are overwritten with
  this suite's initial values (the `aux.` tensors, mapped to the reference's module names);
- the batches are this suite's training batches over a seeded set of random images (--augment
  off), handed to the reference as its data loader (with a strong view, the pair of views its own
  loader gives), with what this suite drew in each step where the reference would draw (CRD's
  negatives).

Then the reference trains N steps with its own training code (RepDistiller's train_student.py:
its networks, its distiller modules, its train_distill loop and its optimizer; mdistiller's
BaseTrainer over its distiller, or its fork's; torchdistill's DistillationBox stepped by its
example's train_one_epoch; cls_KD's loss module alone, its mmcls distiller's loop being the
harness's transcription), imported from the checkout at run time in a process of its own,
and this suite trains N steps through train(), as cifar.py does. Per step, the script prints
both sides' total loss and the largest relative difference, ||ours - theirs|| / ||theirs||,
over the student's tensors and over the learned parts.

--record writes the reference's trajectory as numbers (per step: the loss, and per tensor its norm
and its projection on a fixed random direction) with the reference's commit, so that
tests/test_parity.py checks this suite's steps against it without the reference at hand.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

HERE = os.path.dirname(os.path.abspath(__file__))
# Where each reference keeps the student (mdistiller's networks are RepDistiller's, names included).
STUDENT_PREFIX = {'RepDistiller': 'module_list.0.', 'mdistiller': 'distiller.student.',
                  'logit-standardization-KD': 'distiller.student.', 'torchdistill': 'student.'}
# Forks of mdistiller, told apart by what their configuration adds (or a file only they have); their
# side runs as mdistiller's, over the networks of MDISTILLER_NETWORKS where theirs differ.
FORKS = {'logit-standardization-KD': 'LOGIT_STAND', 'CAT-KD': 'CAT_KD',
         'SDD-CVPR2024': 'mdistiller/distillers/SDD_DKD.py',
         'Multi-Level-Logit-Distillation': 'mdistiller/distillers/KD_ours.py'}  # MLKD's authors'
STUDENT_PREFIX.update({fork: STUDENT_PREFIX['mdistiller'] for fork in FORKS})


class Fork(NamedTuple):
    """A fork of RepDistiller whose side runs as RepDistiller's: a file only it has, its spelling of
    the flags the harness passes to train_student.py, and the modules it imports that the harness's
    batches do not need (stood in for). Its train_distill may take more than RepDistiller's; the
    modules among its arguments are in reach under their argument's name. `torch_1_kl_div`: it
    differentiates F.kl_div with respect to its target, which torch up to 1.12 did with 0 where the
    target is 0, and later versions do with 0/0 (NaN)."""
    mark: str
    spelling: dict = {}
    stand_ins: tuple = ()
    torch_1_kl_div: bool = False


REPDISTILLER_FORKS = {
    # Its learned temperature reaches the teacher's probabilities, one of which DKD masks to exactly 0.
    'CTKD': Fork('models/temp_global.py', {'--path_t': '--path-t', '--print_freq': '--print-freq'},
                 ('imgaug', 'imgaug.augmenters'), torch_1_kl_div=True),
    'TTM': Fork('distiller_zoo/wttm.py'),  # WTTM's authors'
}
STUDENT_PREFIX.update({fork: STUDENT_PREFIX['RepDistiller'] for fork in REPDISTILLER_FORKS})
# cls_KD (NKD's authors', on mmcls): its logit losses, in the loop of its distiller (cls_kd_side).
STUDENT_PREFIX['cls_KD'] = 'student.'
ROOT = os.path.dirname(HERE)
SEED = 0
STUDENT, TEACHER, CLASSES = 'resnet8', 'resnet20', 100
BATCH, LR = 16, 0.05  # RepDistiller trains with batch 64; 16 keeps the fp64 steps quick


def references():
    """{column: methods.base.Reference}: every benchmark column whose reference the harness runs,
    as the methods' own files declare it (Method.references)."""
    import methods
    return methods.references()


def reference_name(name, method, init=False):
    """The reference's name of our tensor `name` ('student.*' or 'aux.*'), in its main stage or
    (`init`) its init stage, or None."""
    from models import zoo
    ref = references()[method]
    for pattern, replacement in ref.init_parts if init else ref.parts:  # a student tensor it names otherwise too
        m = re.fullmatch(pattern, name)
        if m:
            return replacement(m) if callable(replacement) else m.expand(replacement)
    if name.startswith('student.'):
        return STUDENT_PREFIX[ref.code] + zoo.repdistiller_name(STUDENT, name[len('student.'):])
    return None


# ----------------------------------------------------------------------------------------------
# The common start: weights, images and our learned parts' initial values, all drawn in fp64
# (torch's fp64 draws take the same path on every CPU, its fp32 normal draw does not).

def networks(workdir, steps):
    """Student and teacher drawn from SEED as RepDistiller draws them, their batch norms' running
    statistics those of the harness's images (one forward in training mode, each layer taking
    its batch's statistics whole), saved as RepDistiller checkpoints; returns the paths. A
    teacher whose statistics fit its inputs keeps its activations in scale, as a trained one does."""
    from unittest import mock

    import torch.nn.functional as F

    from datasets.cifar import NORMALIZATION
    from models import zoo
    from models.init import initialize
    x = images(steps)[0].double()
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in NORMALIZATION['cifar100'])
    x = (x - mean) / std
    batch_norm = F.batch_norm

    def taking_the_batch_statistics(*args, **kwargs):
        return batch_norm(*args, **{**kwargs, 'momentum': 1.0})
    paths = {}
    torch.manual_seed(SEED)
    for role, arch in (('student', STUDENT), ('teacher', TEACHER)):
        f, params = zoo.network(arch, CLASSES)
        params = {k: v.detach().double() for k, v in params.items()}
        initialize(params, zoo.family(arch), 'crd')
        with torch.no_grad(), mock.patch.object(F, 'batch_norm', taking_the_batch_statistics):
            f(x, params, True)
        folder = os.path.join(workdir, f'{arch}_vanilla')  # where RepDistiller reads a teacher's name from
        os.makedirs(folder, exist_ok=True)
        paths[role] = os.path.join(folder, 'ckpt_epoch_240.pth')
        torch.save({'model': zoo.to_repdistiller(params, arch)}, paths[role])
    return paths


def images(steps):
    g = torch.Generator().manual_seed(SEED)
    n = steps * BATCH
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), \
        torch.randint(0, CLASSES, (n,), generator=g)


def redraw_parts_(params):
    """Our learned parts' initial values, redrawn in fp64 with the spread of their own draw
    (rounded to 3 digits), so that they are the same on every machine; constants stay."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for k, v in params.items():
            if not k.startswith('aux.') or 'running' in k or v.numel() < 2 or bool((v == v.flatten()[0]).all()):
                continue
            spread = float(f'{float(v.double().std()):.3g}')
            v.copy_((torch.rand(v.shape, dtype=torch.float64, generator=g) * 2 - 1) * spread * 3 ** 0.5)


# ----------------------------------------------------------------------------------------------
# This suite's side

def our_flags(method, n_train):
    """The column's flags as crd_table.sh passes them, fitted to the harness's n_train images, and
    those that reproduce the reference where this suite's default differs (Reference.ours)."""
    import methods
    columns = methods.columns('crd', TEACHER, STUDENT, methods.probe(TEACHER, STUDENT, CLASSES))
    flags = []
    for k, v in methods.for_training_set(columns[method], n_train).items():
        if isinstance(v, bool):  # a switch
            flags += [f'--{k}'] if v else []
        else:
            flags += [f'--{k}', json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return flags + [str(a) for a in references()[method].ours]  # where the default differs on purpose


def ours(method, steps, workdir):
    """Trains this suite N steps as the reference does (a method with an init stage: N steps of
    it, then N of the main stage). Returns the losses and states (per step the total loss, and
    {our tensor name: value} of the student and the learned parts after it), the learned parts'
    initial values, the batches of each stage, and the networks' files."""
    from unittest import mock

    import cifar
    import methods
    from datasets.cifar import Loader
    from engine.cohort import start_runs
    from engine.members import build_members
    from engine.training import train
    from methods import crd
    from utils import DTYPES
    paths = networks(workdir, steps)
    x, y = images(steps)
    argv = ['--arch', STUDENT, '--teacher_params', paths['teacher'], '--teacher_arch', TEACHER,
            '--student_params', paths['student'], '--dataset', 'CIFAR100', '--dtype', 'double',
            '--batch_size', BATCH, '--lr', LR, '--weight_decay', 5e-4, '--epochs', 1,
            '--epoch_step', '[150,180,210]', '--lr_decay_ratio', 0.1, '--augment', 'off',
            '--normalization', 'cifar100', '--compile', 'off', '--reference',
            '--seed', SEED, '--save', os.path.join(workdir, 'ours', method), *our_flags(method, steps * BATCH)]
    if references()[method].init:
        argv += ['--init_epochs', 1]
    opt = cifar.parse_args([str(a) for a in argv])
    device, runs = start_runs(opt, cifar.CIFAR_RULES, cifar.TEACHER_FLAGS)
    teacher = cifar.load_teacher(opt, CLASSES)
    start = cifar.load_student_params(opt, CLASSES)
    layout = dict(dtype=DTYPES[opt.dtype], channels_last=False, normalization=opt.normalization)
    train_loader = Loader(x, y, BATCH, train=True, seed=opt.data_seed, augment=False,
                          strong_view=methods.strong_view(opt), **layout)
    test_loader = Loader(x[:BATCH], y[:BATCH], BATCH, train=False, **layout)
    members = build_members(runs, lambda: cifar.student(opt, CLASSES, start), teacher, image_size=32,
                            device=device, channels_last=False, train_labels=train_loader.labels)
    member = members[0]
    redraw_parts_(member.params)
    initial = {k: v.detach().clone() for k, v in member.params.items() if k.startswith('aux.')}
    losses, states, pending = [], [], []
    # What a method holds at zero (a tensor its reference's network lacks) is checked to stay zero instead.
    held = {member.objective.prefix + n for m in member.objective.methods for n in m.held_at_zero(opt)}
    weighted_sum = member.weighted_sum

    def recording_sum(terms):
        loss = weighted_sum(terms)
        pending.append(float(loss.detach()))
        return loss
    member.weighted_sum = recording_sum

    def after_step(optimizer, args, kwargs):
        losses.append(pending[-1])
        states.append({k: v.detach().clone() for k, v in member.params.items()
                       if k.startswith(('student.', 'aux.')) and k not in held})
        if any(bool(member.params[k].any()) for k in held):
            sys.exit(f'{method}: {", ".join(sorted(held))} no longer zero after a step')
    hook = register_optimizer_step_post_hook(after_step)
    # What a method draws in a step (CRD's negatives, with the sample itself in column 0), for the
    # reference to be fed the same draws.
    contrasts = []
    scores = crd.scores

    def recording_scores(*args):
        contrasts.append(args[4].detach().clone())
        return scores(*args)
    try:
        with mock.patch.object(crd, 'scores', recording_scores):
            train(opt, members, train_loader, test_loader, num_classes=CLASSES, device=device,
                  n_images=(len(x), BATCH))
    finally:
        hook.remove()
    batches = {}
    for stage, epoch in (('init', 0), ('main', 1)):  # an init epoch draws the batches of epoch 0
        train_loader.set_epoch(epoch)
        # With a strong view, the images are the pair [batch, strong view], as MLKD's own loader gives them.
        batches[stage] = [([xb, *strong] if strong else xb, yb, index) for xb, yb, _, index, *strong in train_loader]
    if contrasts:
        batches['main'] = [(*b, c) for b, c in zip(batches['main'], contrasts)]
    return losses, states, initial, batches, paths, vars(opt)


# ----------------------------------------------------------------------------------------------
# The reference's side, in a process of its own (its `models` package is not ours)

class Float64(torch.Tensor):
    """A batch whose .float() keeps fp64: the reference's loop casts its input to fp32. What is
    computed from it is a plain tensor (a loop that does not cast it, a fork's, takes .float() of
    its accuracy counts)."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    def float(self):
        return self.as_subclass(torch.Tensor)


def tensors_of(**modules):
    """{name: tensor} of every parameter and buffer of `modules`, named within one namespace, and of
    the lists of tensors a module keeps as a plain attribute ('<module>.<attribute>.<i>': mdistiller's
    OFD margins), each made fp64 in place: the reference rounds them to fp32 where it builds them,
    and is handed this suite's fp64 values instead."""
    tree = torch.nn.ModuleDict(modules)
    listed = {}
    for prefix, module in tree.named_modules():
        for attribute, value in vars(module).items():
            if isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
                value[:] = [v.double() for v in value]
                listed.update({f'{prefix}.{attribute}.{i}': v for i, v in enumerate(value)})
    return {**dict(tree.named_parameters()), **dict(tree.named_buffers()), **listed}


def tensor(tensors, name):
    """The reference's tensor `name`, or a slice of it ('params[2:4]'), and a key for it that is
    the same under any name; (None, None) where it is not in reach."""
    base, _, part = (name or '').partition('[')
    if base not in tensors:
        return None, None
    t = tensors[base]
    if not part:
        return t, id(t)
    start, stop = map(int, part.rstrip(']').split(':'))
    return t[start:stop], (id(t), start, stop)


def load_parts(parts, tensors, names, loaded):
    """Our initial values of the learned parts into the reference's tensors, each tensor once
    (`loaded`: the keys done; the init stage's parts are trained by the main stage)."""
    with torch.no_grad():
        for ours_name, value in parts.items():
            t, key = tensor(tensors, names.get(ours_name))
            if t is not None and key not in loaded:
                t.copy_(value.reshape(t.shape))  # a tensor of the same values in another shape (OFD's margins)
                loaded.add(key)


def recording(tensors, names, loss_of_step, run, losses, states):
    """Runs `run`, appending after each optimizer step its loss and {our name: value} of the
    reference's tensors in reach."""
    wanted = {ours_name: ref for ours_name, ref in names.items() if tensor(tensors, ref)[0] is not None}

    def after_step(optimizer, args, kwargs):
        losses.append(float(loss_of_step()))
        states.append({ours_name: tensor(tensors, ref)[0].detach().clone() for ours_name, ref in wanted.items()})
    hook = register_optimizer_step_post_hook(after_step)
    try:
        return run()
    finally:
        hook.remove()


def outputs_of(modules):
    """Forward hooks summing what `modules` return (a loss or a list of losses per group)."""
    seen, handles = [], []

    def record(module, args, output):
        out = sum(output) if isinstance(output, (list, tuple)) else output
        seen.append(out.detach().clone() if torch.is_tensor(out) else torch.tensor(float(out)))
    for m in modules:
        handles.append(m.register_forward_hook(record))
    return seen, handles


def reference_side(reference, workdir):
    spec = torch.load(os.path.join(workdir, 'spec.pt'), weights_only=False)
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, reference)
    if spec['code'] == 'mdistiller' or spec['code'] in FORKS:
        return mdistiller_side(spec, workdir)
    if spec['code'] == 'torchdistill':
        return torchdistill_side(spec, workdir, reference)
    if spec['code'] == 'cls_KD':
        return cls_kd_side(spec, workdir, reference)
    import inspect
    import types
    logger = types.ModuleType('tensorboard_logger')  # a logging dependency the training does not need
    logger.Logger = lambda *a, **k: types.SimpleNamespace(log_value=lambda *a, **k: None)
    sys.modules['tensorboard_logger'] = logger
    fork = REPDISTILLER_FORKS.get(spec['code'], Fork(''))
    for name in fork.stand_ins:
        sys.modules[name] = types.ModuleType(name)
        parent, _, child = name.rpartition('.')
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    torch.Tensor.cuda = lambda self, *a, **k: self  # a fork's loop may move tensors to a GPU unasked
    if fork.torch_1_kl_div:
        kl_div = torch.nn.functional.kl_div

        def torch_1_kl_div(input, target, *args, **kwargs):  # the same values; no gradient reaches a zero target
            return kl_div(input, torch.where(target == 0, target.detach(), target), *args, **kwargs)
        torch.nn.functional.kl_div = torch_1_kl_div
    import train_student as ts
    student_path, build = spec['paths']['student'], ts.model_dict[spec['student']]

    def student(num_classes):
        model = build(num_classes=num_classes)
        model.load_state_dict(torch.load(student_path)['model'])
        return model
    ts.model_dict = {**ts.model_dict, spec['student']: student}
    if os.path.isfile(os.path.join(reference, 'crd', 'memory.py')):  # a fork may not have CRD's package
        import crd.memory
        # Its sampler moves its tables to the GPU unasked; the harness feeds the draws instead.
        crd.memory.AliasMethod.cuda = lambda self: self

    def fed(batches):
        return [(x.as_subclass(Float64), *rest) for x, *rest in batches]
    val_batches = [(x.as_subclass(Float64), y) for x, y, *_ in spec['batches']['main'][:1]]
    loaders = (fed(spec['batches']['main']), val_batches, spec['n_data'])
    # Without is_instance (a fork's call) its batches hold no dataset indices.
    ts.get_cifar100_dataloaders = lambda is_instance=False, **kw: loaders if is_instance else (
        [(x, y) for x, y, *_ in loaders[0]], val_batches)
    ts.get_cifar100_dataloaders_sample = lambda **kw: loaders
    losses, states, loaded = [], [], set()
    real_train, real_init = ts.train, getattr(ts, 'init', None)

    def init(model_s, model_t, init_modules, criterion, train_loader, logger, opt):
        tensors = tensors_of(module_list=torch.nn.ModuleList([model_s]), init_modules=init_modules,
                             criterion=criterion)
        load_parts(spec['parts'], tensors, spec['init_names'], loaded)
        seen, handles = outputs_of([criterion])

        def step_loss():  # the init stage's loss is its criterion's, unweighted
            loss = sum(seen)
            seen.clear()
            return loss
        try:
            return recording(tensors, spec['init_names'], step_loss,
                             lambda: real_init(model_s, model_t, init_modules, criterion,
                                               fed(spec['batches']['init']), logger, opt), losses, states)
        finally:
            for h in handles:
                h.remove()

    def train(*args):
        # train_distill(epoch, train_loader, module_list, criterion_list, optimizer, opt), or a fork's
        given = dict(zip(inspect.signature(real_train).parameters, args))
        criterion_list, opt = given['criterion_list'], given['opt']
        tensors = tensors_of(**{k: v for k, v in given.items() if isinstance(v, torch.nn.Module)})
        load_parts(spec['parts'], tensors, spec['names'], loaded)
        kd = criterion_list[2]
        cls, h_cls = outputs_of([criterion_list[0]])
        div, h_div = outputs_of([criterion_list[1]])
        kd_losses, h_kd = outputs_of(kd if isinstance(kd, torch.nn.ModuleList) else [kd])

        def step_loss():  # train_distill's gamma * CE + alpha * KD + beta * the method's
            loss = opt.gamma * cls[-1] + opt.alpha * div[-1] + opt.beta * (sum(kd_losses) if kd_losses else 0.0)
            kd_losses.clear()
            return loss
        try:
            done = recording(tensors, spec['names'], step_loss, lambda: real_train(*args), losses, states)
        finally:
            for h in h_cls + h_div + h_kd:
                h.remove()
        if given.get('epoch') == opt.epochs:
            # What the script does after its last step (evaluation, checkpoints, its log) is not compared;
            # a fork's may not run on the harness's one validation batch (TTM's expects an accuracy above 0).
            raise Trained
        return done

    class Trained(Exception):
        pass
    ts.train, ts.init = train, init
    sys.argv = ['train_student.py', *spec['argv']]
    os.chdir(workdir)
    try:
        ts.main()
    except Trained:
        pass
    torch.save({'losses': losses, 'states': states}, os.path.join(workdir, 'reference.pt'))


def mdistiller_side(spec, workdir):
    """mdistiller's BaseTrainer (its optimizer, train_epoch and train_iter) over its distiller of
    the method, built from its default configuration with the Reference's overrides."""
    import types
    writer = types.ModuleType('tensorboardX')  # a logging dependency the training does not need
    writer.SummaryWriter = lambda *a, **k: types.SimpleNamespace(add_scalar=lambda *a, **k: None,
                                                                 flush=lambda: None)
    sys.modules['tensorboardX'] = writer
    torch.Tensor.cuda = lambda self, *a, **k: self  # its loops move every batch to a GPU unasked
    import ast

    from mdistiller.distillers import distiller_dict
    from mdistiller.engine import trainer_dict
    from mdistiller.engine.cfg import CFG
    from mdistiller.models import cifar_model_dict
    cfg = CFG.clone()
    for key, value in zip(spec['argv'][::2], spec['argv'][1::2]):  # yacs wants each default's type
        node, (*path, last) = cfg, key.split('.')
        for name in path:
            node = node[name]
        if last not in node:  # a key a fork's train script adds to the configuration (SDD's M and warmup)
            node[last] = ast.literal_eval(value)
        else:
            node[last] = value if isinstance(node[last], str) else type(node[last])(ast.literal_eval(value))
    cfg.SOLVER.LR, cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.EPOCHS = LR, BATCH, 1
    cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MOMENTUM = 5e-4, 0.9
    cfg.LOG.PREFIX, cfg.LOG.WANDB = workdir, False

    def network(role, arch):
        state = torch.load(spec['paths'][role])['model']
        if spec['code'] in MDISTILLER_NETWORKS:
            return MDISTILLER_NETWORKS[spec['code']](cifar_model_dict, arch, cfg, state)
        model = cifar_model_dict[arch][0](num_classes=CLASSES)
        model.load_state_dict(state)
        return model
    distiller = distiller_dict[cfg.DISTILLER.TYPE](network('student', spec['student']),
                                                   network('teacher', spec['teacher']), cfg)
    distiller = torch.nn.DataParallel(distiller)  # as its train.py wraps it; on a CPU it calls the module
    tensors = tensors_of(distiller=distiller.module)
    load_parts(spec['parts'], tensors, spec['names'], set())
    def fed(x):  # a batch, or the pair of views of a loader that makes a strong view
        return [v.as_subclass(Float64) for v in x] if isinstance(x, list) else x.as_subclass(Float64)
    train = [(fed(x), *rest) for x, *rest in spec['batches']['main']]
    val = [(fed(x[0] if isinstance(x, list) else x), y) for x, y, *_ in spec['batches']['main'][:1]]
    trainer = trainer_dict[cfg.SOLVER.TRAINER]('parity', distiller, train, val, cfg)
    losses, states, seen = [], [], []

    def record(module, args, kwargs, output):  # the loss train_iter steps on: its loss dict's sum
        if module.training:
            seen.append(sum(loss.mean() for loss in output[1].values()).detach())
    hook = distiller.module.register_forward_hook(record, with_kwargs=True)
    try:
        recording(tensors, spec['names'], lambda: seen[-1], lambda: trainer.train_epoch(1), losses, states)
    finally:
        hook.remove()
    torch.save({'losses': losses, 'states': states}, os.path.join(workdir, 'reference.pt'))


def sdd_network(models, arch, cfg, state):
    """SDD's networks that also score their regions ('<arch>_sdd'), told the scales as its train
    script tells them (its --M, in the configuration)."""
    model = models[arch + '_sdd'][0](num_classes=CLASSES, M=cfg.M)
    model.load_state_dict(state)
    return model


def catkd_network(models, arch, cfg, state):
    """CAT-KD's networks as its train.py converts them ('<arch>_test'): the classifier's weight
    as a 1x1 convolution before the pool, 'conv_test', and no bias. Its dictionary lists no
    resnet8 of the kind; its class builds one as it builds resnet20's."""
    from mdistiller.models.cifar.resnet import ResNet_test
    extra = {'resnet8': lambda num_classes: ResNet_test(8, [16, 16, 32, 64], 'basicblock', num_classes=num_classes)}
    model = (models[arch + '_test'][0] if arch + '_test' in models else extra[arch])(num_classes=CLASSES)
    own = model.state_dict()
    classifier = next(v for k, v in state.items() if k not in own and v.dim() == 2)
    model.load_state_dict({**{k: v for k, v in state.items() if k in own},
                           'conv_test.weight': classifier.view(*classifier.shape, 1, 1)})
    return model


# Forks of mdistiller whose networks are not mdistiller's: (its model dictionary, our name of the
# network, its configuration, the network's state dict under RepDistiller's names) -> the network.
MDISTILLER_NETWORKS = {'SDD-CVPR2024': sdd_network, 'CAT-KD': catkd_network}


def torchdistill_side(spec, workdir, reference):
    """torchdistill's DistillationBox (its forward_process, post_forward_process and optimizer)
    stepped by its example's train_one_epoch, over a WeightedSumLoss of the cross-entropy (weight 1)
    and the method's sub-term, which the Reference's arguments describe as dotted paths under
    `sub_terms` and their values. torchdistill has no CIFAR networks of RepDistiller's, so both are
    this suite's transcription of them (tests/repdistiller_reference.py, same state-dict names)."""
    import ast
    sys.path.insert(0, os.path.join(reference, 'examples', 'torchvision'))
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from image_classification import train_one_epoch
    from torchdistill.core.distillation import get_distillation_box

    from repdistiller_reference import REFERENCES

    def network(role, arch):
        model = REFERENCES[arch](CLASSES)
        model.load_state_dict(torch.load(spec['paths'][role])['model'])
        return model
    terms = {'ce': {'criterion': {'key': 'CrossEntropyLoss', 'kwargs': {'reduction': 'mean'}},
                    'criterion_wrapper': {'key': 'SimpleLossWrapper', 'kwargs': {
                        'input': {'is_from_teacher': False, 'module_path': '.', 'io': 'output'},
                        'target': {'uses_label': True}}},
                    'weight': 1.0}}
    for key, value in zip(spec['argv'][::2], spec['argv'][1::2]):
        node, (*path, last) = terms, key.split('.')
        for name in path:
            node = node.setdefault(name, {})
        try:
            node[last] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a name, not a number
            node[last] = value
    config = {'num_epochs': 1,
              'teacher': {'forward_proc': 'forward_batch_only', 'sequential': [], 'requires_grad': False},
              'student': {'forward_proc': 'forward_batch_only', 'sequential': [], 'requires_grad': True,
                          'frozen_modules': []},
              'optimizer': {'key': 'SGD', 'kwargs': {'lr': LR, 'momentum': 0.9, 'weight_decay': 5e-4}},
              'criterion': {'key': 'WeightedSumLoss', 'kwargs': {'sub_terms': terms}}}
    # Its script evaluates the teacher before training (unless --student_only), which leaves the
    # teacher in eval mode for the whole run; nothing in the box sets the mode of the teacher.
    teacher = network('teacher', spec['teacher']).eval()
    box = get_distillation_box(teacher, network('student', spec['student']), {}, config, torch.device('cpu'), None,
                               False, 1)
    box.train_data_loader = [(x, y, {}) for x, y, *_ in spec['batches']['main']]
    tensors = tensors_of(student=box.student_model)
    losses, states, seen = [], [], []
    forward = box.forward_process

    def forward_process(*args, **kwargs):  # the loss its post_forward_process steps on
        loss = forward(*args, **kwargs)
        seen.append(loss.detach())
        return loss
    box.forward_process = forward_process
    box.pre_epoch_process(epoch=0)
    recording(tensors, spec['names'], lambda: seen[-1], lambda: train_one_epoch(box, torch.device('cpu'), 0, 1000),
              losses, states)
    torch.save({'losses': losses, 'states': states}, os.path.join(workdir, 'reference.pt'))


def cls_kd_side(spec, workdir, reference):
    """cls_KD's logit loss, the class of its mmcls/models/dis_losses/ that the Reference names first,
    built with the keyword arguments that follow, imported from the checkout with a stand-in for the
    mmcls registry it registers with (nothing else of mmcls or mmengine is needed). It is trained
    by a loop that does what cls_KD's ClassificationDistiller.loss and mmengine's training loop do:
    the whole distiller in training mode (the loop calls its train() every epoch, which reaches the
    teacher), the teacher's logits without gradient, the student's cross-entropy (its head's
    CrossEntropyLoss, weight 1) plus the loss, summed (mmengine's parse_losses), and an SGD step
    (its OptimWrapper: backward, step, zero_grad). cls_KD has no CIFAR networks of RepDistiller's,
    so both are this suite's transcription of them (tests/repdistiller_reference.py)."""
    import ast
    import importlib.util
    import types

    import torch.nn.functional as F
    registry = types.ModuleType('mmcls.registry')
    registry.MODELS = types.SimpleNamespace(register_module=lambda *a, **k: (lambda cls: cls))
    sys.modules['mmcls'], sys.modules['mmcls.registry'] = types.ModuleType('mmcls'), registry
    name, *arguments = spec['argv']
    stem = name[:-len('Loss')].lower()
    found = importlib.util.spec_from_file_location(
        f'cls_kd_{stem}', os.path.join(reference, 'mmcls', 'models', 'dis_losses', f'{stem}.py'))
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    kwargs = {k: ast.literal_eval(v) for k, v in zip(arguments[::2], arguments[1::2])}
    criterion = getattr(module, name)(name=f'loss_{stem}', use_this=True, **kwargs)
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from repdistiller_reference import REFERENCES

    def network(role, arch):
        model = REFERENCES[arch](CLASSES)
        model.load_state_dict(torch.load(spec['paths'][role])['model'])
        return model
    student, teacher = network('student', spec['student']), network('teacher', spec['teacher'])
    teacher.requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    losses, states, seen = [], [], []

    def epoch():
        student.train()
        teacher.train()
        for x, y, *_ in spec['batches']['main']:
            logit_s = student(x)
            with torch.no_grad():
                logit_t = teacher(x)
            loss = F.cross_entropy(logit_s, y) + criterion(logit_s, logit_t, y)
            seen.append(loss.detach())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    recording(tensors_of(student=student), spec['names'], lambda: seen[-1], epoch, losses, states)
    torch.save({'losses': losses, 'states': states}, os.path.join(workdir, 'reference.pt'))


def reference_argv(ref, options):
    """The reference's arguments: templates filled with the run's options, and functions of the
    options and the pair's networks (methods.probe) for what the reference is told about their shapes."""
    import methods
    nets = methods.probe(TEACHER, STUDENT, CLASSES)
    return [str(a(options, nets)) if callable(a) else str(a).format(**options) for a in ref.argv]


def run_reference(reference, method, workdir, initial, batches, paths, names, init_names, options):
    ref = references()[method]
    argv = reference_argv(ref, options)  # mdistiller's: its configuration's overrides, KEY VALUE ...
    if ref.code == 'RepDistiller' or ref.code in REPDISTILLER_FORKS:  # train_student.py's command line
        argv = ['--path_t', paths['teacher'], '--model_s', STUDENT, *argv, '--batch_size', BATCH, '--epochs', 1,
                '--learning_rate', LR, '--num_workers', 0, '--print_freq', 1000,
                *(['--init_epochs', 1] if ref.init else [])]
        spelling = REPDISTILLER_FORKS[ref.code].spelling if ref.code in REPDISTILLER_FORKS else {}
        argv = [spelling.get(a, a) for a in argv]
    spec = {'argv': [str(a) for a in argv], 'code': ref.code, 'student': STUDENT, 'teacher': TEACHER,
            'paths': paths, 'batches': batches,
            'n_data': sum(len(b[1]) for b in batches['main']), 'names': names, 'init_names': init_names,
            'parts': initial}
    torch.save(spec, os.path.join(workdir, 'spec.pt'))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), '--reference', reference,
                           '--reference-side', workdir], cwd=workdir, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f'the reference failed on {method}:\n{done.stdout[-2000:]}{done.stderr[-4000:]}')
    return torch.load(os.path.join(workdir, 'reference.pt'), weights_only=False)


# ----------------------------------------------------------------------------------------------
# Comparing, and the numbers the tests keep

# Below this norm a tensor is measured absolutely: a quantity that is 0 in exact arithmetic (the
# running mean of a batch norm whose input is itself batch-normalised with zero shift, as in
# ReviewKD's deepest level at the first step) is rounding noise on both sides, and its relative
# difference means nothing.
ZERO = 1e-6


def relative(a, b):
    scale = max(float(b.double().norm()), ZERO)
    return float((a.double().flatten() - b.double().flatten()).norm()) / scale


def fingerprint(state):
    """{name: [norm, projection on a fixed random direction]}: what the tests compare."""
    out = {}
    for k in sorted(state):
        v = state[k].detach().double().flatten()
        g = torch.Generator().manual_seed(len(k) * 7919 + v.numel())
        direction = torch.randn(v.numel(), dtype=torch.float64, generator=g)
        out[k] = [float(v.norm()), float(v @ direction)]
    return out


def compare(method, steps, reference, commit, record):
    with tempfile.TemporaryDirectory() as workdir:
        losses, states, initial, batches, paths, options = ours(method, steps, workdir)
        names = {k: reference_name(k, method) for k in states[0]}
        init_names = {k: reference_name(k, method, init=True) for k in states[0]}
        missing = [k for k, v in names.items() if v is None]
        if missing:
            sys.exit(f'{method}: no reference name for {missing[0]}; add it to the parts of its Reference')
        theirs = run_reference(reference, method, workdir, initial, batches, paths, names,
                               {k: v for k, v in init_names.items() if v is not None}, options)
    ref = references()[method]
    argv = ' '.join(reference_argv(ref, options))
    print(f'\n{method}: {ref.code} {commit[:7]} {argv}, {steps} steps, fp64')
    print('| step | loss here | loss there | student weights | learned parts |')
    print('| --- | --- | --- | --- | --- |')
    worst, where, trained = 0.0, None, 0.0
    for step, (ours_state, their_state) in enumerate(zip(states, theirs['states']), 1):
        # The reference's parts outside its stage (FT's translator during the init stage) are not in reach.
        apart = {k: relative(v, their_state[k]) for k, v in ours_state.items()
                 if k.startswith('student.') or k.startswith('aux.') and k in their_state}
        student = max(d for k, d in apart.items() if k.startswith('student.'))
        parts = [d for k, d in apart.items() if k.startswith('aux.')]
        if max(apart.values()) > worst:
            where = max(apart, key=apart.get)
            worst = apart[where]
        trained = max(trained, *(d for k, d in apart.items() if 'running' not in k))
        shown_parts = f'{max(parts):.1e}' if parts else '-'
        print(f'| {step} | {losses[step - 1]:.12g} | {theirs["losses"][step - 1]:.12g} | {student:.1e} | '
              f'{shown_parts} |')
    asked = steps * (2 if ref.init else 1)  # an init stage's steps, then the main stage's
    if len(theirs['states']) != asked or len(states) != asked:
        sys.exit(f'{method}: {len(states)} steps here, {len(theirs["states"])} there, {asked} asked')
    print(f'largest relative difference: {worst:.1e}' + (f' ({where})' if where else ''))
    if trained != worst:
        print(f'largest relative difference of the trained tensors (running statistics aside): {trained:.1e}')
    if record:
        os.makedirs(record, exist_ok=True)
        trajectory = {'method': method, 'reference': ref.code, 'commit': commit,
                      'argv': argv, 'steps': steps,
                      'largest_relative_difference': worst, 'losses': theirs['losses'],
                      'weights': [fingerprint(s) for s in theirs['states']]}
        with open(os.path.join(record, f'{method}.json'), 'w') as f:
            json.dump(trajectory, f, indent=0)
    return worst


def checkout(reference):
    """Which reference a checkout holds: RepDistiller or one of its REPDISTILLER_FORKS, mdistiller or one
    of its FORKS, torchdistill, or cls_KD."""
    if os.path.isdir(os.path.join(reference, 'torchdistill', 'core')):
        return 'torchdistill'
    if os.path.isfile(os.path.join(reference, 'mmcls', 'models', 'classifiers', 'distiller.py')):
        return 'cls_KD'
    cfg = os.path.join(reference, 'mdistiller', 'engine', 'cfg.py')
    if not os.path.isfile(cfg):
        return next((name for name, fork in REPDISTILLER_FORKS.items()
                     if os.path.isfile(os.path.join(reference, fork.mark))), 'RepDistiller')
    with open(cfg) as f:
        text = f.read()
    return next((fork for fork, mark in FORKS.items()
                 if mark in text or os.path.isfile(os.path.join(reference, mark))), 'mdistiller')


def main(argv=None):
    global TEACHER, STUDENT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--reference', required=True,
                   help="a checkout of a reference's code: RepDistiller (or a fork of it: CTKD, TTM), mdistiller (or "
                        "its logit-standardisation fork), torchdistill or cls_KD")
    p.add_argument('--method', default='all', help='a benchmark column (kd, at, vid ...), or all')
    p.add_argument('--steps', default=5, type=int)
    p.add_argument('--commit', default='', help="the reference's commit (default: git rev-parse HEAD in --reference)")
    p.add_argument('--record', default='', help='folder to write the reference trajectories to (JSON, one per method)')
    p.add_argument('--pair', default=f'{TEACHER}:{STUDENT}', metavar='TEACHER:STUDENT',
                   help='the networks (RepDistiller names); the recorded trajectories are of the default pair')
    p.add_argument('--reference-side', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_side:
        return reference_side(os.path.abspath(args.reference), args.reference_side)
    if args.pair != f'{TEACHER}:{STUDENT}':
        if args.record:
            sys.exit(f'--record keeps the trajectories of the pair the tests run ({TEACHER}:{STUDENT}); drop --pair')
        TEACHER, STUDENT = args.pair.split(':')
    sys.path.insert(0, ROOT)
    code = checkout(args.reference)
    known = tuple(c for c, ref in references().items() if ref.code == code)
    if args.method != 'all' and args.method not in known:
        sys.exit(f'--method {args.method} has no reference in {code}; use one of {", ".join(known)} or all')
    chosen = known if args.method == 'all' else (args.method,)
    commit = args.commit or subprocess.run(['git', '-C', args.reference, 'rev-parse', 'HEAD'], capture_output=True,
                                           text=True).stdout.strip() or 'unknown'
    results = {m: compare(m, args.steps, os.path.abspath(args.reference), commit, args.record) for m in chosen}
    print('\n| method | largest relative difference |\n| --- | --- |')
    for m, worst in results.items():
        print(f'| {m} | {worst:.1e} |')


if __name__ == '__main__':
    main()

"""How hard each weighted loss term pulls on the student, against the classification term.

    python3 benchmarks/term_gradients.py -- <cifar.py flags of a run or a cohort, --epochs 1 say>

Trains the run (or cohort) as cifar.py does and, at every main-stage training step of each member,
measures the L2 norm of the gradient, over the student's trained tensors, of each weighted term
(weight x term, as the step sums them) and of the classification term (the cross-entropy, or with
--alpha the distillation term that holds it). It prints, per member and term, the weight and the
ratio of the term's gradient norm to the classification term's: its mean over the steps, and its
value at the first and the last step. A ratio far above 1 means the term, not the labels, steers
the student; at a learning rate tuned for the cross-entropy alone that can stall or break
training. The measurement costs one extra backward pass per term and step; the run's folders are
written as cifar.py writes them (pass a scratch --save).
"""
import os
import statistics
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar  # noqa: E402
from engine import members as members_module  # noqa: E402
from engine.objective import kind  # noqa: E402

CLASSIFICATION = ('cross_entropy', 'distillation')


def gradient_norm(value, tensors):
    grads = torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)))


def measuring(record):
    """Member.weighted_sum that also records, while training the main stage, each weighted term's
    gradient norm over the student's trained tensors: record[member][term] gets one per step."""
    weighted_sum = members_module.Member.weighted_sum

    def measured(self, terms):
        if torch.is_grad_enabled() and self.stage == 'main':
            prefix = 'student.' if any(k.startswith('student.') for k in self.params) else ''
            student = [v for k, v in self.params.items()
                       if v.requires_grad and k.startswith(prefix) and not k.startswith('aux.')]
            for name, value in terms.items():
                weight = self.weights[kind(name)]
                if weight and value.requires_grad:
                    record[self.name][name].append((weight, gradient_norm(weight * value, student)))
        return weighted_sum(self, terms)
    return measured


def table(record):
    lines = ['| member | term | weight | gradient norm / classification term\'s: mean | first step | last step |',
             '| --- | --- | --- | --- | --- | --- |']
    for member, terms in record.items():
        reference = next((terms[n] for n in CLASSIFICATION if n in terms), None)
        if reference is None:
            continue
        for name, values in terms.items():
            if name in CLASSIFICATION:
                continue
            ratios = [g / r for (_, g), (_, r) in zip(values, reference) if r]
            if ratios:
                lines.append(f'| {member} | {name} | {values[0][0]:g} | {statistics.mean(ratios):.3g} | '
                             f'{ratios[0]:.3g} | {ratios[-1]:.3g} |')
    return '\n'.join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '--':
        argv = argv[1:]
    record = defaultdict(lambda: defaultdict(list))
    members_module.Member.weighted_sum = measuring(record)
    try:
        cifar.main(argv)
    except SystemExit as e:
        if e.code:
            raise
    print(f'\n{platform_line()}\n')
    print(table(record))


def platform_line():
    import platform
    return f'{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads'


if __name__ == '__main__':
    main()

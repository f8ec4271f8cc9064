"""What each run measures over an epoch: the mean and spread of its loss and of each loss
term, and its accuracy, kept on the device until the epoch ends (no host sync per step)."""
import torch
from ignite.metrics import Accuracy, Metric, TopKCategoricalAccuracy

from engine import distributed


class MeanStd(Metric):
    """Mean and sample standard deviation of one scalar per batch (the reference code's
    AverageValueMeter). Values stay on the device until the epoch ends: no host sync per step.
    Under torchrun each process's value is weighted by its share of the batch and summed, which
    gives the value of the whole batch."""

    def __init__(self, output_transform=lambda o: o, device='cpu'):
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self._values = []

    def update(self, output):
        value, share = output
        self._values.append(value.detach().float().reshape(()) * share)

    def running_mean(self):
        return torch.stack(self._values).mean() if self._values else float('nan')

    def compute(self):
        if not self._values:
            return [None, None]
        v = distributed.all_reduce_sum(torch.stack(self._values)).double().cpu()
        std = v.std().item() if len(v) > 1 else None  # undefined for a single batch
        return [v.mean().item(), std]


def shown_loss(members):
    """The mean training loss so far this epoch of the first of `members` (those taking this
    step: in an init stage, not every member does) still training, for the progress bar. Under
    torchrun each process's running mean holds its share-weighted values, so their sum (one
    small all-reduce, which every rank must join) is the mean over the global batches: the
    figure the epoch's train_loss will log."""
    meter = next((m.train_meters.metrics['loss'] for m in members if not m.stopped), None)
    value = meter.running_mean() if meter is not None else float('nan')
    # Every rank has the same members stopped and the same steps taken, so all or none reduce.
    return distributed.all_reduce_sum(value) if torch.is_tensor(value) else value


class Meters:
    """One run's meters over an epoch: loss, accuracy (top-1, and top-k for ImageNet) and one
    MeanStd per loss term, fed from the step's output for that run."""

    def __init__(self, term_names, topk, device, accuracy=True):
        # accuracy False: steps that give no logits (an init stage that trains a method's own parts only)
        self.metrics = {'loss': MeanStd(lambda o: (o['loss'], o['share']), device)}
        if accuracy:
            self.metrics['top1'] = Accuracy(lambda o: (o['y_pred'], o['y']), device=device)
        if accuracy and topk > 1:
            self.metrics[f'top{topk}'] = TopKCategoricalAccuracy(topk, lambda o: (o['y_pred'], o['y']),
                                                                 device=device)
        for name in term_names:
            self.metrics['term:' + name] = MeanStd(lambda o, name=name: (o['terms'][name], o['share']), device)

    def reset(self):
        for m in self.metrics.values():
            m.reset()

    def update(self, output):
        for m in self.metrics.values():
            m.update(m._output_transform(output))

    def compute(self):
        return {name: m.compute() for name, m in self.metrics.items()}

    def state(self):
        """The epoch so far, for a checkpoint written in its middle: each loss meter's values and
        each accuracy's counts, summed over the processes of a torchrun job (a collective: every
        rank calls it), on the CPU."""
        state = {}
        for name, m in self.metrics.items():
            if isinstance(m, MeanStd):
                values = [torch.stack(m._values) if m._values else torch.zeros(0, device=m._device)]
            else:  # ignite's accuracies: their additive counts
                values = [torch.as_tensor(getattr(m, k), device=m._device) for k in m._state_dict_all_req_keys]
            state[name] = [distributed.all_reduce_sum(v).cpu() for v in values]
        return state

    def restore(self, state):
        """Goes on with the epoch that `state` holds, so that its line counts every step of it. Rank
        0 takes the whole counts and the other ranks start from zero: an epoch's figures are sums
        over the processes."""
        own = distributed.is_main()
        for name, m in self.metrics.items():
            values = [(v if own else torch.zeros_like(v)).to(m._device) for v in state[name]]
            if isinstance(m, MeanStd):
                m._values = list(values[0].unbind())
            else:
                for k, v in zip(m._state_dict_all_req_keys, values):
                    setattr(m, k, v if torch.is_tensor(getattr(m, k)) else v.item())

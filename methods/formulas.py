"""Formulas that several methods share; each method's own loss is in its own file.

Inputs may be bf16 (autocast): sums and norms are taken in fp32.
"""
import torch
import torch.nn.functional as F


def at_least_fp32(x):
    """bf16/fp16 activations (autocast) are summed and normalised in fp32; fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def same_resolution(x, y):
    """Two activations at one spatial size: the larger is average-pooled down to the smaller,
    the CRD benchmark's rule (RepDistiller) for pairs of different architectures, whose groups
    may end at different resolutions (ShuffleNet's at 16, 8, 4 against ResNet's 32, 16, 8).
    The activations are pooled, not the maps, as RepDistiller does, so that AT figures of such
    pairs compare with its own."""
    if x.shape[2:] == y.shape[2:]:
        return x, y
    x, y = at_least_fp32(x), at_least_fp32(y)
    if x.shape[2] > y.shape[2]:
        return F.adaptive_avg_pool2d(x, y.shape[2:]), y
    return x, F.adaptive_avg_pool2d(y, x.shape[2:])


def feature_distance(s, t):
    """Mean squared difference of two activation tensors of equal shape: F-ActT compares each
    group's output in full, FitNets compares a regressed student group with the teacher's."""
    return (at_least_fp32(s) - at_least_fp32(t)).pow(2).mean()


def input_gradient(logits, labels, x, create_graph=False):
    """J = dL/dx, the cross-entropy's gradient with respect to the input image. The loss is
    summed over the batch, so each sample's J is its own loss's gradient whatever the batch
    size. create_graph=True keeps J differentiable (for the student: double backprop)."""
    loss = F.cross_entropy(at_least_fp32(logits), labels, reduction='sum')
    return torch.autograd.grad(loss, x, create_graph=create_graph)[0]

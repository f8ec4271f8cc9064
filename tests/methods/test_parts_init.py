"""The learned parts that come from RepDistiller start as its modules do: its CC and CRD embeddings
are torch Linear layers and its VID regressors bias-free 1x1 Conv2d layers at torch's defaults, so the
same generator state gives the same tensors bit for bit."""
import torch
import torch.nn as nn

from methods.parts import torch_conv_weight, torch_linear_params


def test_embeddings_start_as_torch_linear_layers():
    torch.manual_seed(3)
    layer = nn.Linear(64, 128)
    torch.manual_seed(3)
    ours = torch_linear_params(64, 128)
    assert torch.equal(ours['weight'], layer.weight.detach()) and torch.equal(ours['bias'], layer.bias.detach())


def test_vid_regressors_start_as_torch_convolutions():
    torch.manual_seed(4)
    layer = nn.Conv2d(16, 32, 1, bias=False)
    torch.manual_seed(4)
    assert torch.equal(torch_conv_weight(16, 32), layer.weight.detach())

import torch

from utils import cast, flatten, print_tensor_dict


def test_flatten_keeps_order_and_drops_none():
    nested = {'conv0': 1, 'group0': {'block0': {'conv0': 2, 'convdim': None, 'bn0': {'weight': 3}}}, 'fc': {'bias': 4}}
    assert list(flatten(nested).items()) == [('conv0', 1), ('group0.block0.conv0', 2),
                                             ('group0.block0.bn0.weight', 3), ('fc.bias', 4)]


def test_cast_keeps_requires_grad_and_integer_types():
    p = {'w': torch.ones(2, requires_grad=True), 'rm': torch.zeros(2), 'n': torch.tensor(3)}
    c = cast(p, 'double')
    assert c['w'].dtype == torch.float64 and c['w'].requires_grad and c['w'].is_leaf
    assert not c['rm'].requires_grad and c['n'].dtype == torch.int64


def test_parameter_table_lists_every_tensor(capsys):
    print_tensor_dict({'conv0': torch.zeros(16, 3, 3, 3), 'bn.running_mean': torch.zeros(16)}, 448)
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith('  ')]
    assert len(rows) == 2 and '16x3x3x3' in rows[0] and 'float32' in rows[1] and '(no grad)' in rows[1]
    assert 'Total number of parameters: 448' in printed

"""RepDistiller's CIFAR-100 networks (github.com/HobbitLong/RepDistiller, models/) as compact
nn.Modules, written for these tests from the published definitions: the same computations and
the same state-dict names as the originals, so that a checkpoint of one loads in the other.

forward(x, is_feat=True) returns (feats, logits) as RepDistiller's networks do (preact=False);
feats[1:-1] are the groups its attention-transfer baseline compares. REFERENCES maps our
architecture names (zoo.ARCHS) to constructors of num_classes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def conv(ni, no, k, stride=1, groups=1, bias=False):
    return nn.Conv2d(ni, no, k, stride, k // 2, groups=groups, bias=bias)


def shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def outputs(feats, logits, is_feat):
    return (feats, logits) if is_feat else logits


class BasicBlock(nn.Module):  # models/resnet.py
    def __init__(self, ni, no, stride):
        super().__init__()
        self.conv1, self.bn1 = conv(ni, no, 3, stride), nn.BatchNorm2d(no)
        self.conv2, self.bn2 = conv(no, no, 3), nn.BatchNorm2d(no)
        self.downsample = (nn.Sequential(conv(ni, no, 1, stride), nn.BatchNorm2d(no))
                           if stride != 1 or ni != no else None)

    def forward(self, x):
        o = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(o + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv(3, widths[0], 3), nn.BatchNorm2d(widths[0])
        for g in range(3):
            ni, no = widths[g], widths[g + 1]
            self.add_module(f'layer{g + 1}', nn.Sequential(*[
                BasicBlock(ni if i == 0 else no, no, 2 if g and i == 0 else 1) for i in range(n)]))
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x, is_feat=False):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            feats.append(layer(feats[-1]))
        feats.append(F.avg_pool2d(feats[-1], 8).flatten(1))
        return outputs(feats, self.fc(feats[-1]), is_feat)


class Bottleneck(nn.Module):  # models/resnetv2.py
    def __init__(self, ni, planes, stride):
        super().__init__()
        no = 4 * planes
        self.conv1, self.bn1 = conv(ni, planes, 1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv(planes, no, 1), nn.BatchNorm2d(no)
        self.shortcut = (nn.Sequential(conv(ni, no, 1, stride), nn.BatchNorm2d(no))
                         if stride != 1 or ni != no else nn.Sequential())

    def forward(self, x):
        o = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(o)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 64, 3), nn.BatchNorm2d(64)
        ni = 64
        for g, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(ni, planes, 2 if g and i == 0 else 1))
                ni = 4 * planes
            self.add_module(f'layer{g + 1}', nn.Sequential(*blocks))
        self.linear = nn.Linear(2048, num_classes)

    def forward(self, x, is_feat=False):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            feats.append(layer(feats[-1]))
        feats.append(F.adaptive_avg_pool2d(feats[-1], 1).flatten(1))
        return outputs(feats, self.linear(feats[-1]), is_feat)


class WideBlock(nn.Module):  # models/wrn.py
    def __init__(self, ni, no, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(ni), conv(ni, no, 3, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(no), conv(no, no, 3)
        self.equal = ni == no
        self.convShortcut = None if self.equal else conv(ni, no, 1, stride)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        o = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return o + (x if self.equal else self.convShortcut(a))


class NetworkBlock(nn.Module):
    def __init__(self, n, ni, no, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(ni if i == 0 else no, no, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = conv(3, 16, 3)
        self.block1 = NetworkBlock(n, w[0], w[1], 1)
        self.block2 = NetworkBlock(n, w[1], w[2], 2)
        self.block3 = NetworkBlock(n, w[2], w[3], 2)
        self.bn1, self.fc = nn.BatchNorm2d(w[3]), nn.Linear(w[3], num_classes)

    def forward(self, x, is_feat=False):
        feats = [self.conv1(x)]
        for block in (self.block1, self.block2, self.block3):
            feats.append(block(feats[-1]))
        feats.append(F.avg_pool2d(F.relu(self.bn1(feats[-1])), 8).flatten(1))
        return outputs(feats, self.fc(feats[-1]), is_feat)


VGG_CONFIGS = {8: [[64], [128], [256], [512], [512]],
               11: [[64], [128], [256, 256], [512, 512], [512, 512]],
               13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
               16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
               19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]}


class VGG(nn.Module):  # models/vgg.py, batch_norm=True
    def __init__(self, depth, num_classes):
        super().__init__()
        ni = 3
        for b, widths in enumerate(VGG_CONFIGS[depth]):
            layers = []
            for no in widths:
                layers += [conv(ni, no, 3, bias=True), nn.BatchNorm2d(no), nn.ReLU()]
                ni = no
            self.add_module(f'block{b}', nn.Sequential(*layers[:-1]))  # ReLU applied in forward
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x, is_feat=False):
        h, feats = x.shape[2], []
        o = x
        for b in range(5):
            feats.append(F.relu(getattr(self, f'block{b}')(o)))
            o = F.max_pool2d(feats[-1], 2) if b < 3 or (b == 3 and h == 64) else feats[-1]
        feats.append(F.adaptive_avg_pool2d(o, 1).flatten(1))
        return outputs(feats, self.classifier(feats[-1]), is_feat)


class InvertedResidual(nn.Module):  # models/mobilenetv2.py
    def __init__(self, ni, no, stride, t):
        super().__init__()
        self.residual = stride == 1 and ni == no
        self.conv = nn.Sequential(conv(ni, ni * t, 1), nn.BatchNorm2d(ni * t), nn.ReLU(),
                                  conv(ni * t, ni * t, 3, stride, groups=ni * t), nn.BatchNorm2d(ni * t),
                                  nn.ReLU(), conv(ni * t, no, 1), nn.BatchNorm2d(no))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileHalf(nn.Module):  # mobile_half: T = 6, width 0.5
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Sequential(conv(3, 16, 3, 2), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks, ni = nn.ModuleList(), 16
        for t, c, n, s in self.SETTING:
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(ni, c // 2, s if i == 0 else 1, t))
                ni = c // 2
            self.blocks.append(nn.Sequential(*layers))
        self.conv2 = nn.Sequential(conv(ni, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

    def forward(self, x, is_feat=False):
        o, feats = self.conv1(x), []
        feats.append(o)
        for s, block in enumerate(self.blocks):
            o = block(o)
            if s in (1, 2, 4, 6):
                feats.append(o)
        o = F.avg_pool2d(self.conv2(o), 2, ceil_mode=True).flatten(1)
        feats.append(o)
        return outputs(feats, self.classifier(o), is_feat)


class ShuffleUnit(nn.Module):  # models/ShuffleNetv1.py
    def __init__(self, ni, no, stride, groups):
        super().__init__()
        mid, self.g, self.stride = no // 4, 1 if ni == 24 else groups, stride
        self.conv1, self.bn1 = conv(ni, mid, 1, groups=self.g), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv(mid, mid, 3, stride, groups=mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv(mid, no, 1, groups=groups), nn.BatchNorm2d(no)

    def forward(self, x):
        o = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        o = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(o)))))
        if self.stride == 2:
            return F.relu(torch.cat([o, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(o + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 24, 1), nn.BatchNorm2d(24)
        ni = 24
        for g, (no, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
            units = []
            for i in range(n):
                units.append(ShuffleUnit(ni, no - ni if i == 0 else no, 2 if i == 0 else 1, 3))
                ni = no
            self.add_module(f'layer{g + 1}', nn.Sequential(*units))
        self.linear = nn.Linear(960, num_classes)

    def forward(self, x, is_feat=False):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            feats.append(layer(feats[-1]))
        feats.append(F.avg_pool2d(feats[-1], 4).flatten(1))
        return outputs(feats, self.linear(feats[-1]), is_feat)


class SplitUnit(nn.Module):  # models/ShuffleNetv2.py BasicBlock
    def __init__(self, channels):
        super().__init__()
        c = channels // 2
        self.conv1, self.bn1 = conv(c, c, 1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = conv(c, c, 3, groups=c), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = conv(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        c = x.shape[1] // 2
        o = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x[:, c:])))))
        return shuffle(torch.cat([x[:, :c], F.relu(self.bn3(self.conv3(o)))], 1), 2)


class DownUnit(nn.Module):  # models/ShuffleNetv2.py DownBlock
    def __init__(self, ni, no):
        super().__init__()
        mid = no // 2
        self.conv1, self.bn1 = conv(ni, ni, 3, 2, groups=ni), nn.BatchNorm2d(ni)
        self.conv2, self.bn2 = conv(ni, mid, 1), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = conv(ni, mid, 1), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = conv(mid, mid, 1), nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        return shuffle(torch.cat([left, F.relu(self.bn5(self.conv5(right)))], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 24, 1), nn.BatchNorm2d(24)
        ni = 24
        for g, (no, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
            self.add_module(f'layer{g + 1}', nn.Sequential(DownUnit(ni, no), *[SplitUnit(no) for _ in range(n)]))
            ni = no
        self.conv2, self.bn2 = conv(464, 1024, 1), nn.BatchNorm2d(1024)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x, is_feat=False):
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            feats.append(layer(feats[-1]))
        o = F.relu(self.bn2(self.conv2(feats[-1])))
        feats.append(F.avg_pool2d(o, 4).flatten(1))
        return outputs(feats, self.linear(feats[-1]), is_feat)


REFERENCES = {
    **{f'resnet{d}': lambda c, d=d: CifarResNet(d, (16, 16, 32, 64), c) for d in (8, 14, 20, 32, 44, 56, 110)},
    'resnet8x4': lambda c: CifarResNet(8, (32, 64, 128, 256), c),
    'resnet32x4': lambda c: CifarResNet(32, (32, 64, 128, 256), c),
    'ResNet50': ResNet50,
    **{f'wrn_{d}_{w}': lambda c, d=d, w=w: WideResNet(d, w, c) for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f'vgg{d}': lambda c, d=d: VGG(d, c) for d in (8, 11, 13, 16, 19)},
    'MobileNetV2': MobileHalf,
    'ShuffleV1': ShuffleNetV1,
    'ShuffleV2': ShuffleNetV2,
}

"""The CIFAR-100 network zoo of the CRD paper (Tian, Krishnan & Isola 2020, "Contrastive
Representation Distillation"), one module per family, each network a pure function over a flat
parameter dict like `resnet.resnet`:

    f, params = <family>.<constructor>(..., num_classes)
    logits, groups = f(x, params, mode, base='')

`groups` are the stage outputs that the CRD paper's attention-transfer baseline compares (its
`feat[1:-1]`). With `pooled=True` every network returns `(logits, groups, feature)`, the feature
being the (B, C) vector its classifier reads (RepDistiller's `feat[-1]`, which CC, RKD, PKT and
CRD compare), from the same forward pass. With `preact=True` they return `(logits, groups,
feature, preact_groups)`, each group before the ReLU that follows it as RepDistiller's
`preact=True` features define it (AB and OFD compare those), and `f.bn_before_relu` names, per
group, the BN that sets that value's distribution (mdistiller's `get_bn_before_relu`; None for
the ShuffleNets, which neither names). Each module's docstring says what its preact groups are.
The Wide ResNets are `resnet.resnet` itself.
`models/zoo.py` names the architectures as the CRD paper's tables do and loads its published
checkpoints.

    cifar_resnet      resnet8 ... resnet110, resnet8x4, resnet32x4 (basic blocks)
    resnet_bottleneck ResNet50 (bottleneck blocks, CIFAR stem)
    vgg               vgg8 ... vgg19 with batch norm
    mobilenetv2       MobileNetV2 at half width
    shufflenetv1      ShuffleV1 (g = 3)
    shufflenetv2      ShuffleV2 (1x)
"""

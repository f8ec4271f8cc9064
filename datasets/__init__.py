"""The data: CIFAR in both layouts as in-memory uint8 batches (cifar.py), and ImageNet-style image
folders decoded by worker processes (imagenet.py)."""

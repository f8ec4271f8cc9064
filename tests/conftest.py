import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def random_images(n, seed):
    """Images whose mean colour depends on the label, so a few steps of training can see it."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    base = (labels[:, None, None, None] * 25).astype(np.int64)
    noise = rng.integers(0, 60, size=(n, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels


def make_image_tree(root, n_train=100, n_test=40, ext='png'):
    """root/train/<class>/*.png and root/test/<class>/*.png, ten classes."""
    for split, n, seed in (('train', n_train, 0), ('test', n_test, 1)):
        images, labels = random_images(n, seed)
        for i, (im, label) in enumerate(zip(images, labels)):
            d = os.path.join(root, split, f'class{label}')
            os.makedirs(d, exist_ok=True)
            Image.fromarray(im).save(os.path.join(d, f'{i:04d}.{ext}'))
    return root


def make_python_release(root, n_train=100, n_test=40):
    """root/cifar-10-batches-py/ in the layout of the official python release."""
    d = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(d, exist_ok=True)
    images, labels = random_images(n_train, 0)
    chunks = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(chunks, 1):
        batch = {'data': images[idx].transpose(0, 3, 1, 2).reshape(len(idx), -1),
                 'labels': labels[idx].tolist()}
        with open(os.path.join(d, f'data_batch_{i}'), 'wb') as f:
            pickle.dump(batch, f, protocol=2)
    images, labels = random_images(n_test, 1)
    with open(os.path.join(d, 'test_batch'), 'wb') as f:
        pickle.dump({'data': images.transpose(0, 3, 1, 2).reshape(n_test, -1),
                     'labels': labels.tolist()}, f, protocol=2)
    return root


@pytest.fixture(scope='session')
def image_tree(tmp_path_factory):
    return make_image_tree(str(tmp_path_factory.mktemp('tree')))


@pytest.fixture(scope='session')
def python_release(tmp_path_factory):
    return make_python_release(str(tmp_path_factory.mktemp('release')))


def check_png(path, min_width, min_height):
    """Opens a figure and checks it has a sensible size and is not blank; returns its pixels."""
    with Image.open(path) as im:
        pixels = np.asarray(im.convert('RGB'))
    assert pixels.shape[1] >= min_width and pixels.shape[0] >= min_height, pixels.shape
    assert pixels.shape[1] <= 4000 and pixels.shape[0] <= 4000, pixels.shape
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50 and pixels.std() > 10, 'figure looks blank'
    return pixels


def run_cli(script, *args, cwd, env=None):
    """Runs a top-level script as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='2', **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_in_process(main, *args, cwd):
    """Runs a script's main(argv) in this process, in `cwd`, as run_cli runs it in another: a
    CompletedProcess with the exit code and what it printed (seconds faster: no imports)."""
    import contextlib
    import io
    out, err, code = io.StringIO(), io.StringIO(), 0
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())

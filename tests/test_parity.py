"""Every method with a reference implementation trains step for step as the reference does: this
suite's first steps, from the parity harness's seeded start (benchmarks/parity.py), against the
reference's trajectory recorded by that harness (tests/fixtures/parity/, one file per method, with
the reference's commit). The harness compares the two sides directly where the reference is at
hand; these tests need only the numbers."""
import glob
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'benchmarks'))
import parity  # noqa: E402

RECORDED = sorted(glob.glob(os.path.join(HERE, 'fixtures', 'parity', '*.json')))
TOLERANCE = 1e-9  # relative, per tensor (parity.ZERO below): the harness finds 2.3e-10 or better between the codebases


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fp64 convolutions on 16 images: threads only wait for each other
    yield
    torch.set_num_threads(threads)


def load(path):
    with open(path) as f:
        return json.load(f)


def test_every_method_of_the_harness_has_a_recorded_reference_trajectory():
    assert {os.path.basename(p)[:-len(".json")] for p in RECORDED} == set(parity.references())


@pytest.mark.parametrize('path', RECORDED, ids=lambda p: os.path.basename(p)[:-len('.json')])
def test_steps_equal_the_references(path, tmp_path):
    want = load(path)
    assert want['steps'] >= 5 and len(want['commit']) == 40
    losses, states, *_ = parity.ours(want['method'], want['steps'], str(tmp_path))
    # A method with an init stage: its steps, then as many of the main stage.
    assert len(losses) == len(want['losses']) == want['steps'] * (2 if parity.references()[want['method']].init else 1)
    for step, (loss, expected) in enumerate(zip(losses, want['losses']), 1):
        assert loss == pytest.approx(expected, rel=TOLERANCE), f'loss of step {step}'
    for step, (state, expected) in enumerate(zip(states, want['weights']), 1):
        got = parity.fingerprint(state)
        # The reference's parts outside the stage (FT's translator in the init stage) were out of its reach.
        assert set(expected) <= set(got) and {k for k in got if k.startswith('student.')} <= set(expected)
        for name, (norm, projection) in expected.items():
            scale = max(norm, parity.ZERO)  # a tensor 0 in exact arithmetic is rounding noise
            # Along a random direction the error is of the size of the difference's norm.
            assert abs(got[name][0] - norm) <= TOLERANCE * scale, f'{name} after step {step}'
            assert abs(got[name][1] - projection) <= TOLERANCE * scale * 10, f'{name} after step {step}'

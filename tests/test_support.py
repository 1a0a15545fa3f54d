"""The tests' own support code: the global-state fixture restores what a test changed."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch import seed_everything
from support.state import restored_global_state


def test_global_state_is_restored_after_seeding_and_settings():
    before_env = os.environ.get("PL_GLOBAL_SEED")
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    with restored_global_state():
        seed_everything(1234)
        torch.rand(3)
        np.random.rand(3)
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        assert os.environ["PL_GLOBAL_SEED"] == "1234"
    assert os.environ.get("PL_GLOBAL_SEED") == before_env
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_state)
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype


THREADS = torch.get_num_threads()


def test_a_test_that_seeds_everything():
    seed_everything(4321)  # no restoring here: the autouse fixture of conftest.py does it
    torch.set_num_threads(1)
    assert os.environ["PL_GLOBAL_SEED"] == "4321"


def test_the_next_test_does_not_see_its_seed():
    assert os.environ.get("PL_GLOBAL_SEED") != "4321"
    assert torch.get_num_threads() == THREADS

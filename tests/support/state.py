"""Global state a test may change and must not leak into the next: seeds and torch settings."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

#: Environment variables Lightning's ``seed_everything`` sets (emimimic's samplers read the seed).
SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@contextmanager
def restored_global_state() -> Iterator[None]:
    """Restores, on exit, the random generators of torch, numpy and Python, the seed variables
    of ``seed_everything``, torch's default dtype, thread count and determinism setting."""
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    env = {k: os.environ.get(k) for k in SEED_VARIABLES}
    settings = (torch.get_default_dtype(), torch.get_num_threads(),
                torch.are_deterministic_algorithms_enabled())
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_default_dtype(settings[0])
        torch.set_num_threads(settings[1])
        torch.use_deterministic_algorithms(settings[2])

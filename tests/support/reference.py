"""What many tests share: the repository's paths, and the independent pooling reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emimimic.constants import STEPS

#: The repository root, and the configs the tests run.
REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"


def torch_pool(raw: np.ndarray | torch.Tensor, steps: int = STEPS) -> np.ndarray:
    """Returns a raw ``[T, D]`` clip pooled to ``steps`` rows by torch's own adaptive average
    pooling, in float32, then cast to float16: what every store read must equal, computed
    without emimimic's pooling tables."""
    t = torch.as_tensor(np.asarray(raw)).float()
    return F.adaptive_avg_pool1d(t.T[None], steps)[0].T.half().numpy()

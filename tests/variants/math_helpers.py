"""Helpers of the variants' maths tests (tests/variants/test_*_math.py import it as a plain
module: pytest puts this folder on sys.path when it imports a test file from it)."""

import numpy as np
import torch


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pearson(a, b) -> float:
    """Naive Pearson correlation; 0 when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))

import os

import pytest
import torch

# Kernel tests run Triton on the CPU through its interpreter (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)


@pytest.fixture
def rng():
    """A fresh, seeded generator per test (fresh random inputs, reproducible failures)."""
    return torch.Generator().manual_seed(1234)

import pytest
import torch


@pytest.fixture(autouse=True)
def poison_uninitialized_outputs():
    """Every torch.empty in a kernel test comes back filled with NaN (and integer outputs with their max), so
    an output element a kernel forgot to write fails the comparison instead of passing by luck."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # CUDA scatter_add_ has no deterministic twin
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)

"""The kernel tests' poisoning fixture (conftest.py) is on: an output element a kernel forgot to write is NaN,
so it fails the comparison instead of passing by luck. (This test lived in conftest.py, where pytest never
collects tests.)"""
import torch


def test_poisoning_is_active():
    assert torch.isnan(torch.empty(16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, 5))).all()
    assert torch.isnan(torch.empty(4, dtype=torch.bfloat16)).all()

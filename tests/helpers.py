"""Helpers shared by the test modules (plain imports: two conftest modules would collide)."""
import pytest
import torch

# GPU test modules: skipped, with the reason shown, where torch sees no CUDA GPU
needs_cuda = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: the fused kernels run on the device machine"),
]


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())

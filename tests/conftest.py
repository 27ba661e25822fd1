"""Shared test settings: small, deterministic, CPU-only."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_small():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: on a shared 2-core machine two threads spin against other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

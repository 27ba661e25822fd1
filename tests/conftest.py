"""Shared test settings: small, deterministic, CPU-only."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_small():
    torch.manual_seed(0)
    yield

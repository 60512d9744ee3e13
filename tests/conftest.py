"""Fixtures shared by the test files."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from more threads, and spinning OpenMP threads make steps
    10-30x slower whenever the machine is shared; restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Unit tests run their small tensor ops on one thread: on a shared 2-core CPU the OpenMP
hand-off costs more than the work (about 50x for tiny convolutions)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

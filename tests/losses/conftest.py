"""Loss tests run on tiny tensors: one intra-op thread is much faster than contending for the
shared cores (and the previous setting is restored for the other test folders)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

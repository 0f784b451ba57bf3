"""The toy tests on one torch thread: their models are tiny, so a second thread gains nothing, and on
cores shared with other work it waits for them. The slow tests that start the studies as commands
pass --threads 1 for the same reason."""
import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test (torch.compile); deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: intra-op threads only add overhead, and on a busy 2-core machine OpenMP
    # spinning makes each small matmul ~100x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

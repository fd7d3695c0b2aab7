import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def devices():
    """CPU always; CUDA as a parameter that skips cleanly without a GPU."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]


def poison_allocator(device, nbytes=64 << 20):
    """Fill memory the allocator will hand out next with a recognisable byte, so
    an op that leaves part of its output unwritten shows garbage, not zeros."""
    t = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t.fill_(0xFF)
    del t


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh inputs each run, but reproducible from the printed seed on failure.
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    # The seed of a real failure only: not of skips or expected failures.
    if (call.when == "call" and call.excinfo is not None
            and not call.excinfo.errisinstance(pytest.skip.Exception)
            and item.get_closest_marker("xfail") is None):
        for k, v in item.user_properties:
            if k == "seed":
                print(f"\n[{item.nodeid}] torch seed {v}")

import os

import pytest
import torch

# Subprocesses the tests start (`python -m kvc.cli`, `python -c ...`) must import kvc as it is
# installed: Python would otherwise put the current folder first on sys.path, and from the
# repository root that is the source kvc/, which lacks kvc.passes and kvc.conf (they are
# installed into the package from passes/ and conf/). PYTHONSAFEPATH (3.11+) drops that entry.
os.environ["PYTHONSAFEPATH"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only contend (on a busy 2-core box, 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

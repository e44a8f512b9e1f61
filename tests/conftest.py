from pathlib import Path

import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli():
    return run_cli



@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread, above all on a busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

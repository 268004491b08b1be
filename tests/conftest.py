import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two cores on CI: keep intra-op threads from fighting over them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see run.py: spinning threads starve subprocesses


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # tests/test_cuda.py: run with `pytest -m cuda tests` on a GPU machine (skipped without CUDA)
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped when torch sees none")

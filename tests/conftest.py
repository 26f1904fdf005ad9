"""Test setup. Without a GPU the kernels run through the Triton interpreter, which must be
switched on before any kernel module is imported, so it is set here, first."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402

# pytest-xdist runs one worker per core; more intra-op threads per worker would only fight them.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Start the long GPU compile check first, so its worker finishes it while the others test."""
    items.sort(key=lambda item: "compiles_for_sm80" not in item.name)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")

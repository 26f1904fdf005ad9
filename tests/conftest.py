"""Test setup. Without a GPU the kernels run through the Triton interpreter, which must be
switched on before any kernel module is imported, so it is set here, first. On a CUDA machine the
interpreter stays off: the kernels compile for the GPU and the harness adds fp16/bf16 cases.

GPUDL_TEST_AS_CUDA=1 makes the suite COLLECT as it would on a CUDA machine (the interpreter off,
the half-precision cases, the `gpu` tests kept); tests/test_suite_on_gpu.py uses it with
`--collect-only` to check that collection here. Nothing may run in that mode without a GPU.
"""

import os

import torch
from helpers import HAS_CUDA, recording_launches

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import warnings  # noqa: E402

import pytest  # noqa: E402

# pytest-xdist runs one worker per core; more intra-op threads per worker would only fight them.
torch.set_num_threads(1)


def _start_order(item) -> int:
    if "compiles_for_sm80" in item.name:
        return 0  # the GPU compile check (the kernel audit): the longest item
    if "test_audit.py" in item.nodeid:
        return 3  # the audit's rule tests read its report
    return 1 if "slow" in item.keywords else 2


def pytest_collection_modifyitems(config, items):
    """Start the long GPU compile check (the kernel audit) first, then the other `slow` tests
    (training runs of minutes), so that the run ends on short tests that the xdist workers share
    (`--dist worksteal`: an idle worker takes half of another's queue) instead of one worker
    finishing a long test alone; run the audit's rule tests last, when its report is there to
    read. Skip the `gpu` tests where there is no CUDA device."""
    items.sort(key=_start_order)
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def device():
    """Where the test's tensors live: CUDA (compiled kernels) when there is one, else the CPU
    (kernels through the Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def on_test_device(device):
    """Tensors made without a device land on the test device (see `device`) for the test's
    duration. The per-kernel test files use it for every test:
    `pytestmark = pytest.mark.usefixtures("on_test_device")`."""
    torch.set_default_device(device)
    yield device
    torch.set_default_device(None)


@pytest.fixture
def exact_fp32_convolutions(monkeypatch):
    """cuDNN's fp32 convolutions in IEEE fp32, not TF32: the reference of the convolution kernels'
    tests on a GPU must be exact. (Only cuDNN's switch: mixing torch's two matmul TF32 APIs in one
    process makes later reads raise, see test_attention_kernel.py.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state (torch, numpy, random: seed 0), whichever
    tests ran before it on its worker, so a failure reproduces alone and under any xdist
    distribution. A test that wants another stream seeds its own generator."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture
def launches():
    """Every Triton kernel launch during the test (helpers.Launches)."""
    with recording_launches() as recorded:
        yield recorded


@pytest.fixture(autouse=True)
def _fallbacks_are_errors(monkeypatch):
    """A kernel op silently answered by the PyTorch reference would pass any comparison with the
    reference: inside tests it is an error, unless the test expects it (pytest.warns). The
    one-time warning set starts empty in every test, so a test's pytest.warns does not depend on
    which tests ran before it in the same worker."""
    from gpudl.kernels import registry

    monkeypatch.setattr(registry, "_warned", set())
    warnings.filterwarnings("error", category=registry.FallbackWarning)

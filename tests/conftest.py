"""Test setup. Without a GPU the kernels run through the Triton interpreter, which must be
switched on before any kernel module is imported, so it is set here, first."""

import collections
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


@pytest.fixture
def kernel_launches(monkeypatch):
    """`record(module)` makes every `wrap_triton(kernel)[grid](...)` launch of that kernel module
    append {"grid": grid, **kwargs} to `launches[name]` (name: the @triton.jit function's, also
    for autotuned kernels) and returns that dict. Works where the op bodies run eagerly (the
    interpreter's custom ops, or eager calls on a GPU)."""
    launches: dict[str, list[dict]] = collections.defaultdict(list)

    def record(module):
        real = module.wrap_triton

        def recording(kernel):
            launcher, fn = real(kernel), kernel
            while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> Python function
                fn = fn.fn
            calls = launches[fn.__name__]

            class _Grid:
                def __getitem__(self, grid):
                    launch = launcher[grid]

                    def run(*args, **kwargs):
                        calls.append({"grid": grid, **kwargs})
                        return launch(*args, **kwargs)

                    return run

            return _Grid()

        monkeypatch.setattr(module, "wrap_triton", recording)
        return launches

    return record

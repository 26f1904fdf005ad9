"""gpudl: classic deep-learning algorithms as Lightning modules on our own Triton kernels."""

from gpudl import backend, ops  # noqa: F401
from gpudl.backend import current_backend, set_backend, use_backend  # noqa: F401

__version__ = "0.1.0"

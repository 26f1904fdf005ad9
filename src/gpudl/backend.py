"""Which implementation `gpudl.ops` runs: our Triton kernels or the PyTorch reference.

Backends:
  auto    Triton for CUDA tensors when the op has a kernel, PyTorch otherwise (the default).
  triton  always Triton; on CPU tensors only when TRITON_INTERPRET=1 was set before
          `gpudl.kernels` was imported (the Triton interpreter), else a clear error.
  torch   always the PyTorch reference.

Precedence, innermost first: the `use_backend(...)` context manager, then the process-wide
setting (`set_backend`, which `gpudl.train` fills from the config key `kernels.backend`), then
the environment variable GPUDL_BACKEND, then "auto". The Hydra config's default for
`kernels.backend` reads GPUDL_BACKEND, so the variable also reaches configured runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")

_process_backend: str | None = None
_context_stack: list[str] = []


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (None clears it, falling back to GPUDL_BACKEND or 'auto')."""
    global _process_backend
    _process_backend = None if name is None else _check_name(name, "set_backend")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on `name` ('auto', 'triton' or 'torch')."""
    _context_stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _context_stack.pop()


def process_backend() -> str | None:
    """The process-wide setting made by `set_backend` (None when unset), e.g. to restore it later."""
    return _process_backend


def current_backend() -> str:
    if _context_stack:
        return _context_stack[-1]
    if _process_backend is not None:
        return _process_backend
    return _check_name(os.environ.get("GPUDL_BACKEND", "auto"), "environment variable GPUDL_BACKEND")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(op: str, tensors: list[torch.Tensor | None]) -> str:
    """Return 'triton' or 'torch' for one call of `gpudl.ops.<op>` on these tensors."""
    backend = current_backend()
    if backend == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        if not on_cuda or not _triton_importable():
            return "torch"
        from gpudl.kernels import registry

        return "triton" if op in registry.REGISTRY else "torch"

    # backend == "triton": forced, so every reason it cannot run is an error, not a fallback.
    if not _triton_importable():
        raise RuntimeError(f"gpudl.ops.{op}: backend 'triton' was asked for but the triton package is not installed")
    from gpudl.kernels import registry

    if op not in registry.REGISTRY:
        known = ", ".join(sorted(registry.REGISTRY)) or "none"
        raise NotImplementedError(
            f"gpudl.ops.{op}: backend 'triton' was asked for but no Triton kernel is registered for "
            f"'{op}' (kernels: {known}); use backend 'auto' or 'torch'"
        )
    if not on_cuda and not registry.INTERPRET:
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"gpudl.ops.{op}: backend 'triton' needs CUDA tensors, got tensors on {', '.join(devices)}. "
            "To run the kernels on the CPU through the Triton interpreter, set TRITON_INTERPRET=1 "
            "before gpudl.kernels is imported; or use backend 'auto' or 'torch'"
        )
    return "triton"

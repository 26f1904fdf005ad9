"""Which implementation `gpudl.ops` runs: our Triton kernels or the PyTorch reference.

Backends:
  auto    on CUDA tensors, for an op with a kernel, the faster of the two for this call's key
          (op, shapes, dtypes, layouts, arguments, GPU): timed once, on the first call with a new
          key, and kept on disk (`gpudl.backend_choice`); PyTorch everywhere else (the default).
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
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from gpudl import backend_choice

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


# The measurement's seams, replaced by the tests (a fake clock and a fake GPU on the CPU).
def _on_gpu(tensors: list[torch.Tensor | None]) -> bool:
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


_timer: backend_choice.Timer = backend_choice.cuda_median_ms

# (device, signature) -> "triton" or "torch", for this process (the disk cache's choices once looked up)
_decided: dict[tuple, str] = {}


def forget_decisions() -> None:
    """Forget this process's decisions and loaded cache files (the next call looks them up again)."""
    _decided.clear()
    backend_choice.forget_loaded_caches()


def _may_measure() -> bool:
    """Timing is refused while torch.compile traces, a CUDA graph is captured, or deterministic
    algorithms are asked for (a choice by timing could differ between runs)."""
    if torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@torch._dynamo.assume_constant_result
def _cached_choice(key: str, device: str, op: str) -> str:
    """The cached side for a key, without measuring ("torch" when none is cached): what compiled
    code and deterministic runs read. torch.compile calls it once while tracing and keeps the answer
    (so the device query and the file read stay out of the graph)."""
    entry = backend_choice.cache_for(_device_name(torch.device(device))).get(key)
    chosen = entry["backend"] if entry else "torch"
    backend_choice.note(key, op, chosen, "cached" if entry else "not measured (compiling, capturing or deterministic)")
    return chosen


def _measure(op: str, key: str, device_name: str, candidates: dict[str, Callable], args: tuple) -> str:
    """Time both sides on clones of args (RNG state restored), keep the faster on disk, return it."""
    times: dict[str, float] = {}
    cuda_devices = sorted({t.device.index or 0 for t in backend_choice.leaves(args) if t.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
            for side in ("triton", "torch"):
                times[side] = float(_timer(side, backend_choice.training_call(candidates[side], args)))
    except Exception as err:  # noqa: BLE001 - a side that cannot run loses, and says why once
        failed = "triton" if "triton" not in times else "torch"
        warnings.warn(f"gpudl.ops.{op}: backend 'auto' could not time the {failed} side for {key} "
                      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); running the other side",
                      stacklevel=4)
        chosen = "torch" if failed == "triton" else "triton"
        backend_choice.note(key, op, chosen, f"{failed} failed while timing")
        return chosen
    chosen = "triton" if times["triton"] < times["torch"] else "torch"
    backend_choice.cache_for(device_name).put(key, {"backend": chosen, **{f"{k}_ms": v for k, v in times.items()}})
    backend_choice.note(key, op, chosen, "measured", times)
    return chosen


def _auto_choice(op: str, tensors: list, args: tuple, candidates: dict[str, Callable]) -> str:
    device = next(t.device for t in tensors if t is not None)
    sig = (device, backend_choice.signature(op, args))
    chosen = _decided.get(sig)
    if chosen is not None:
        return chosen
    key = backend_choice.key_text(sig[1])
    if not _may_measure():
        return _cached_choice(key, str(device), op)
    device_name = _device_name(device)
    entry = backend_choice.cache_for(device_name).get(key)
    if entry is not None:
        chosen = entry["backend"]
        backend_choice.note(key, op, chosen, "cached",
                            {k.removesuffix("_ms"): v for k, v in entry.items() if k.endswith("_ms")})
    else:
        chosen = _measure(op, key, device_name, candidates, args)
    _decided[sig] = chosen
    return chosen


def note_call(op: str, side: str) -> None:
    """Record (once per op, side and setting) that a call of `op` ran on `side`; the measured keys
    are recorded with their times by the `auto` decision itself."""
    backend_choice.note_op(op, side, f"kernels.backend={current_backend()}")


def report() -> dict[str, Any]:
    """Which side ran per op (and per measured key) since `reset_record()`, with the setting and
    the cache file's folder: what train() writes into metrics.json and the W&B summary."""
    return {"setting": current_backend(), "cache_dir": str(backend_choice.cache_dir() / "backend"),
            **backend_choice.report()}


def reset_record() -> None:
    backend_choice.reset_record()


def resolve(op: str, tensors: list[torch.Tensor | None], args: tuple | None = None,
            candidates: dict[str, Callable[..., Any]] | None = None) -> str:
    """Return 'triton' or 'torch' for one call of `gpudl.ops.<op>` on these tensors.

    Under `auto` on CUDA, `args` (the normalized arguments) and `candidates` ({"triton": fn,
    "torch": fn}, each taking *args) let it measure; without them it runs PyTorch."""
    backend = current_backend()
    if backend == "torch":
        return "torch"
    on_gpu = _on_gpu(tensors)
    if backend == "auto":
        if not on_gpu or not _triton_importable():
            return "torch"
        from gpudl.kernels import registry

        spec = registry.REGISTRY.get(op)
        if spec is None or args is None or candidates is None:
            return "torch"
        if spec.unsupported is not None and spec.unsupported(*args) is not None:
            return "triton"  # gpudl.ops runs the reference and warns once, naming the argument
        return _auto_choice(op, tensors, args, candidates)

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
    if not on_gpu and not registry.INTERPRET:
        devices = sorted({str(t.device) for t in tensors if t is not None})
        raise RuntimeError(
            f"gpudl.ops.{op}: backend 'triton' needs CUDA tensors, got tensors on {', '.join(devices)}. "
            "To run the kernels on the CPU through the Triton interpreter, set TRITON_INTERPRET=1 "
            "before gpudl.kernels is imported; or use backend 'auto' or 'torch'"
        )
    return "triton"

"""The `auto` backend's measured choice: which side is faster for one call key, timed once and
kept on disk, and the record of which side ran.

    key        op | each argument: tensor shape, dtype, layout class (contiguous, channels_last,
               strided), whether it needs a gradient; lists element by element; other arguments
               by value (stride, activation, reduction, ... change the work) | device type
    timing     `cuda_median_ms`, the way Triton's autotuner times configs (triton.testing.do_bench,
               triton 3.9): estimate from 5 runs, warm up for ~25 ms, then ~100 ms of repetitions,
               each between its own pair of CUDA events after the L2 cache is flushed; the median.
               A call whose inputs need gradients is timed forward + backward (the work a training
               step pays for), on clones of the inputs, with the RNG state restored afterwards.
    cache      one JSON file per (GPU name, torch version, triton version), in
               $GPUDL_CACHE_DIR/backend/ (default ~/.cache/gpudl, or $XDG_CACHE_HOME/gpudl);
               a different GPU or version reads another file, so it measures again. Written
               atomically, merged with what other processes wrote since it was read.
    record     per key: the side that ran, why (measured, cached, forced, cpu, ...) and the times;
               `report()` summarizes it per op for metrics.json and the W&B summary.

No timing while torch.compile traces or a CUDA graph is captured, nor in deterministic mode: the
cached choice is read, and a key never measured runs PyTorch.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_ENV = "GPUDL_CACHE_DIR"

# A timer measures one candidate: timer(label, fn) -> milliseconds, label "triton" or "torch".
Timer = Callable[[str, Callable[[], Any]], float]


# --------------------------------------------------------------------------- the key
def _layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def _signature(value: Any, grad_mode: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype, _layout(value), grad_mode and value.requires_grad)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v, grad_mode) for v in value)
    return value


def signature(op: str, args: tuple, device_type: str = "cuda") -> tuple:
    """A hashable description of one call (cheap: it is built on every call under `auto`): the op,
    every tensor argument's shape, dtype, layout class and whether it needs a gradient, lists
    element by element, other arguments by value, the device type. Equal signatures do the same work
    (a tensor "needs a gradient" only in grad mode: the backward is part of the work then)."""
    grad_mode = torch.is_grad_enabled()
    return (op, tuple(_signature(a, grad_mode) for a in args), device_type)


def _text(sig: Any) -> str:
    if isinstance(sig, tuple) and len(sig) == 4 and isinstance(sig[1], torch.dtype):
        shape, dtype, layout, grad = sig
        dims = "x".join(str(d) for d in shape) or "scalar"
        return f"{str(dtype).removeprefix('torch.')}[{dims}]{layout}{',grad' if grad else ''}"
    if isinstance(sig, tuple):
        return "(" + ",".join(_text(v) for v in sig) + ")"
    return repr(sig)


def key_text(sig: tuple) -> str:
    """The cache file's key for a signature, e.g.
    'linear|bfloat16[16x1024x768]contiguous,grad|bfloat16[3072x768]contiguous,grad|None|'gelu'|cuda'."""
    op, args, device_type = sig
    return "|".join([op, *(_text(a) for a in args), device_type])


def call_key(op: str, args: tuple, device_type: str = "cuda") -> str:
    return key_text(signature(op, args, device_type))


# --------------------------------------------------------------------------- the disk cache
def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpudl"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version}


def cuda_device_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device())


def cache_file(device_name: str) -> Path:
    """The JSON file that holds the choices made on this GPU model with these torch/triton versions."""
    ident = {"device": device_name, **versions()}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "_" for c in device_name)[:40]
    return cache_dir() / "backend" / f"{slug}-{digest}.json"


class ChoiceCache:
    """The choices of one cache file, loaded once; `put` writes the file through."""

    def __init__(self, path: Path, device_name: str):
        self.path, self.device_name = path, device_name
        self.choices: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except OSError:  # missing (or unreachable: `put` says so when it cannot write)
            return {}
        except ValueError as err:
            warnings.warn(f"gpudl: ignoring the unreadable backend cache {self.path} ({err}); it will be rewritten",
                          stacklevel=3)
            return {}
        if data.get("device") != self.device_name or data.get("versions") != versions():
            return {}  # a file from another GPU or version under this name: measure again
        return dict(data.get("choices", {}))

    def get(self, key: str) -> dict[str, Any] | None:
        return self.choices.get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.choices[key] = entry
        merged = {**self._read(), **self.choices}  # keep what other processes added meanwhile
        self.choices = merged
        payload = {"device": self.device_name, "versions": versions(), "choices": merged}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as err:
            warnings.warn(f"gpudl: could not write the backend cache {self.path} ({err}); "
                          f"set {CACHE_ENV} to a writable folder", stacklevel=3)


_caches: dict[Path, ChoiceCache] = {}
_lock = threading.Lock()


def cache_for(device_name: str) -> ChoiceCache:
    path = cache_file(device_name)
    with _lock:
        if path not in _caches:
            _caches[path] = ChoiceCache(path, device_name)
        return _caches[path]


def forget_loaded_caches() -> None:
    """Drop the in-memory copies (the next lookup reads the files again): for tests, or after
    deleting the cache folder by hand."""
    with _lock:
        _caches.clear()


def clear_cache() -> None:
    """Delete every cached choice on this machine (the files under cache_dir()/backend)."""
    forget_loaded_caches()
    folder = cache_dir() / "backend"
    if folder.is_dir():
        for f in folder.glob("*.json"):
            f.unlink()


# --------------------------------------------------------------------------- timing
def cuda_median_ms(label: str, fn: Callable[[], Any], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median milliseconds of `fn` on the current CUDA stream, timed as triton.testing.do_bench
    times an autotune config (its defaults warmup=25, rep=100 ms): 5 runs estimate the time, then
    max(1, warmup/estimate) warm-up runs and max(1, rep/estimate) timed runs, each timed run after
    an L2 flush (zeroing a 256 MiB buffer) between its own CUDA events."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup, n_repeat = max(1, int(warmup_ms / estimate)), max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for _ in range(n_warmup):
        fn()
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    del flush
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in leaves(v)]
    return []


def training_call(fn: Callable, args: tuple) -> Callable[[], Any]:
    """A closure running `fn` on clones of `args` (so in-place ops and repeated runs leave the
    caller's tensors alone): forward + backward when an input needs a gradient and grad mode is
    on, the forward alone otherwise. Gradients are reset to None before each run, outside the
    work, as do_bench's grad_to_none does."""
    cloned = _clone(args)
    needs_grad = [t for t in leaves(cloned) if t.requires_grad]
    if not (torch.is_grad_enabled() and needs_grad):
        def forward():
            with torch.no_grad():
                return fn(*cloned)
        return forward
    first = [o for o in leaves(fn(*cloned)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in first]

    def forward_backward():
        for t in needs_grad:
            t.grad = None
        outs = [o for o in leaves(fn(*cloned)) if o.requires_grad]
        torch.autograd.backward(outs, grads)
    return forward_backward


# --------------------------------------------------------------------------- the record
_record: dict[str, dict[str, Any]] = {}


def note(key: str, op: str, backend: str, reason: str, times: dict[str, float] | None = None) -> None:
    """Record (once per key) which side ran this key and why."""
    if key not in _record:
        entry: dict[str, Any] = {"op": op, "backend": backend, "reason": reason}
        if times:
            entry.update({f"{k}_ms": round(v, 6) for k, v in times.items()})
        _record[key] = entry


_ops_ran: set[tuple[str, str, str]] = set()  # (op, side, reason) of calls not decided by a key


def note_op(op: str, backend: str, reason: str) -> None:
    """Record that a call of `op` ran on `backend` for a reason other than a measured key
    (forced by the setting, CPU tensors, an unsupported argument)."""
    _ops_ran.add((op, backend, reason))


def reset_record() -> None:
    _record.clear()
    _ops_ran.clear()


def report() -> dict[str, Any]:
    """What ran since the last reset: per op the side (or "mixed" with the counts of keys), per key
    the side, the reason and any times measured."""
    sides: dict[str, dict[str, int]] = {}
    for entry in _record.values():
        counts = sides.setdefault(entry["op"], {})
        counts[entry["backend"]] = counts.get(entry["backend"], 0) + 1
    for op, side, _ in _ops_ran:
        sides.setdefault(op, {}).setdefault(side, 0)
    per_op = {}
    for op, counts in sorted(sides.items()):
        if len(counts) == 1:
            per_op[op] = next(iter(counts))
        else:
            parts = (f"{side} {n} keys" if n else side for side, n in sorted(counts.items()))
            per_op[op] = "mixed (" + ", ".join(parts) + ")"
    reasons = {f"{op}: {side}": reason for op, side, reason in sorted(_ops_ran)}
    return {"ops": per_op, "keys": {k: dict(v) for k, v in sorted(_record.items())}, "other_calls": reasons}

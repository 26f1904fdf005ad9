"""The audit record's keys: what a compilation's figures depend on, hashed.

A compilation's key is a SHA-256 over the kernel's source with every @triton.jit function it
calls (transitively) and the constexpr globals it reads, its signature and constexprs, its unit
strides, num_warps/num_stages, the target arch, the Triton version, and the audit's own analysis
code (so a change to the way the audit reads SASS refreshes every figure). Computing it needs no
compilation.

The source hash follows Triton 3.9's own (`JITCallable.cache_key`: the function's source, then
the key of each JIT function it references, found by `DependenciesFinder`, then the constexpr
globals it reads), without the function's starting line number, which Triton adds because it
ends up in the debug line table: a kernel that moves down its file does not need a refresh.
Autotuner and Heuristics wrappers are unwrapped to the function they run (`.fn`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path

import triton
from triton.runtime.jit import DependenciesFinder, JITCallable

REFRESH_DIR = "bench_results/audit/current"
REFRESH_COMMAND = f"python -m gpudl.kernels.audit --record {REFRESH_DIR}"


def unwrap(kernel):
    """The JIT function under Autotuner/Heuristics wrappers."""
    while not isinstance(kernel, JITCallable) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


_source_hashes: dict[int, str] = {}


def forget() -> None:
    """Drop the memoized source hashes (after a JIT function's source was changed in place)."""
    _source_hashes.clear()


class _Dependencies(DependenciesFinder):
    """Triton's dependency walk, with each called function's hash taken from `source_hash`."""

    def _update_hash(self, func):
        self.hasher.update((source_hash(func) + str(getattr(func, "noinline", False))).encode())


def source_hash(kernel) -> str:
    """SHA-256 of a JIT function's source and of everything it calls and reads (see the module
    docstring)."""
    fn = unwrap(kernel)
    if id(fn) in _source_hashes:
        return _source_hashes[id(fn)]
    _source_hashes[id(fn)] = f"recursion:{fn.__name__}"  # a function that calls itself
    finder = _Dependencies(name=fn.__name__, globals=fn.__globals__,
                           nonlocals=inspect.getclosurevars(fn.fn).nonlocals, src=fn.src)
    finder.visit(fn.parse())
    values = sorted((name, repr(value)) for (name, _), (value, _) in finder.used_global_vals.items()
                    if isinstance(value, (triton.language.constexpr, bool, int, float, str, tuple)))
    digest = hashlib.sha256((finder.ret + repr(values)).encode()).hexdigest()
    _source_hashes[id(fn)] = digest
    return digest


@functools.cache
def _analysis_hash() -> str:
    """The audit code that turns a compilation into figures (a change re-derives every figure)."""
    from gpudl.kernels import _audit_sass, audit, compile_check

    parts = [Path(_audit_sass.__file__).read_text(), inspect.getsource(compile_check.compile_variant),
             inspect.getsource(audit.inspect_compiled), inspect.getsource(compile_check._compile_job)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _value(v) -> str:
    return f"{type(v).__name__}:{v}"


def compilation_key(variant, arch: int, unit) -> str:
    """The key of compiling `variant` for sm_`arch` with the integer arguments in `unit` as 1."""
    payload = {
        "source": source_hash(variant.kernel),
        "signature": sorted(variant.signature.items()),
        "constexprs": sorted((k, _value(v)) for k, v in variant.constexprs.items()),
        "num_warps": variant.num_warps, "num_stages": variant.num_stages, "role": getattr(variant, "role", ""),
        "arch": arch, "unit": sorted(unit), "triton": triton.__version__, "analysis": _analysis_hash(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def load(path: Path) -> dict | None:
    """The record in `path` (a folder holding audit.json, or the file), or None if there is none."""
    path = Path(path)
    file = path / "audit.json" if path.is_dir() or not path.suffix else path
    return json.loads(file.read_text()) if file.exists() else None


def dump(report: dict) -> str:
    """audit.json text: one record per line, sorted by id, so that two branches refreshing
    different kernels touch different lines."""
    head = {k: v for k, v in report.items() if k not in ("records", "baselines")}
    lines = ["{" + json.dumps(head, sort_keys=True)[1:-1] + ","]
    for name in ("records", "baselines"):
        items = sorted(report[name], key=lambda r: r.get("id", r.get("variant", "")))
        body = ",\n".join(json.dumps(r, sort_keys=True, default=str) for r in items)
        lines.append(f'"{name}": [\n{body}\n]' + ("," if name == "records" else ""))
    return "\n".join(lines) + "}\n"

"""Compile every registered kernel variant ahead of time for real GPUs, on any machine.

    python -m gpudl.kernels.compile_check [--op OP ...] [--arch 80 90]

Builds each `CompileVariant` of each `KernelSpec` with `triton.compile` for CUDA sm_80 and sm_90
(the bundled ptxas; no GPU needed) and checks its shared memory against the device's limit per
block. It catches what the interpreter cannot: tl.dot shape rules, loop-carried dtype changes,
shared-memory overflow. Prints one JSON line per compilation, then one summary line
(`N/N compiled, largest shared memory ...`), and exits 1 on any failure.

Each variant is compiled as a real launch specializes it. Triton's JIT turns an integer argument
equal to 1 into a constant and marks pointers and integers divisible by 16; the innermost stride
of a contiguous tensor is 1, which is what lets loads vectorize and pipeline. So the check first
records the launches that the registry's test cases make (in a subprocess under the Triton
interpreter, with the kernels' bodies skipped: only the arguments are read), with their tensors
as the cases make them, transposed (the last two dims stored swapped) and channels_last, and
notes which tensor-stride arguments each launch of each kernel passed as 1. Every variant is then
compiled once per distinct pattern of its kernel (half-precision variants of GEMM-like kernels,
those calling tl.dot: every pattern; the others: the most common contiguous one), with the unit
strides as constants and every other integer and pointer 16-divisible, as round bench shapes
launch. A kernel no case launches compiles with no unit stride. gpudl.kernels.audit reads the
compiled code further.

Must run without TRITON_INTERPRET (the interpreter replaces the @triton.jit functions).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Triton 3.9 warns at every compilation when this is unset (its default, fusion of multiplies and
# adds into FMAs, is to change in 3.10). Launches on a GPU use fusion; so do we, said once here.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

LAYOUTS = ("contiguous", "transposed", "channels_last")
# Tensor-stride arguments ("stride_am", conv's "sx_w"); sizes and conv strides/dilations that equal
# 1 in a small test case are left out, as no bench shape has them.
_TILE_PREFIXES = ("BLOCK", "GROUP", "num_")
_STRIDE_ARG = re.compile(r"^(stride_\w+|s[a-z]{1,2}_[a-z]{1,2})$")


# --------------------------------------------------------------------------- launch capture
def _kernel_key(fn) -> str:
    fn = getattr(fn, "fn", fn)
    return f"{fn.__module__}.{fn.__name__}"


def _relayout(args, layout: str):
    """The case's arguments with every floating tensor stored in `layout` (same values); None when
    the layout changes nothing."""
    import torch

    changed = False

    def convert(a):
        nonlocal changed
        if isinstance(a, (list, tuple)):
            return type(a)(convert(x) for x in a)
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            return a
        t = a.detach()
        if layout == "transposed" and t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
            t = t.mT.contiguous().mT
        elif layout == "channels_last" and t.dim() == 4 and t.shape[1] > 1:
            t = t.contiguous(memory_format=torch.channels_last)
        else:
            return a
        changed = True
        return t.requires_grad_(a.requires_grad)

    out = tuple(convert(a) for a in args)
    return out if (changed or layout == "contiguous") else None


def capture_launches(ops) -> dict:
    """{kernel: [[unit-stride names, {layout: launches}], ...]} of the launches the registry's
    cases make, without running any kernel body. Must run under TRITON_INTERPRET=1."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from gpudl.kernels import REGISTRY

    seen: dict = collections.defaultdict(dict)
    current = ["contiguous"]
    original = InterpretedFunction.run

    def record_only(self, *args, grid, warmup, **kwargs):
        values = {**dict(zip(self.arg_names, args)), **kwargs}
        unit = tuple(sorted(n for n, v in values.items() if type(v) is int and v == 1 and _STRIDE_ARG.match(n)))
        entry = seen[_kernel_key(self)].setdefault(unit, {"layouts": collections.Counter(), "constexprs": {}})
        entry["layouts"][current[0]] += 1
        for name, value in kwargs.items():  # the launch's switches (tile sizes are the autotuner's)
            if type(value) in (bool, int, str) and not name.startswith(_TILE_PREFIXES):
                entry["constexprs"].setdefault(name, set()).add(str(value))

    def flatten(out):
        if isinstance(out, torch.Tensor):
            return [out]
        return [t for x in out for t in flatten(x)] if isinstance(out, (list, tuple)) else []

    InterpretedFunction.run = record_only
    try:
        for op in ops:
            spec = REGISTRY[op]
            for case in spec.cases:
                if case.expect_fallback:
                    continue
                for layout in LAYOUTS:
                    current[0] = layout
                    try:
                        args = _relayout(case.make(torch.float32, torch.device("cpu")), layout)
                        if args is None:
                            continue
                        out = spec.triton(*args)
                        grads = [t for t in flatten(out) if t.requires_grad and t.is_floating_point()]
                        if grads and spec.differentiable:
                            torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
                    except Exception:  # an unsupported layout, or host code reading skipped results
                        pass
    finally:
        InterpretedFunction.run = original
    return {key: [{"unit": list(unit), "layouts": dict(e["layouts"]),
                   "constexprs": {k: sorted(v) for k, v in e["constexprs"].items()}} for unit, e in patterns.items()]
            for key, patterns in seen.items()}


def captured_launches(ops) -> dict:
    """`capture_launches` run in a subprocess under the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "gpudl.kernels.compile_check", "--capture", *ops],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"capturing the launches failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- specializations
def is_gemm_like(kernel) -> bool:
    """The kernel, or a @triton.jit function it calls, uses tl.dot."""
    from triton.runtime.jit import JITFunction

    todo, done = [kernel], set()
    while todo:
        fn = todo.pop()
        if id(fn) in done:
            continue
        done.add(id(fn))
        if "tl.dot(" in fn.src:
            return True
        todo += [g for name, g in fn.fn.__globals__.items() if isinstance(g, JITFunction) and f"{name}(" in fn.src]
    return False


def is_half(variant) -> bool:
    return any(kind in ("*bf16", "*fp16") for kind in variant.signature.values())


def data_dtype(variant) -> str:
    """The variant's floating dtype: its half-precision pointers' if it has any, else the dtype it
    computes in (a tl.float64 / tl.float32 constexpr such as ACC), else its pointers' fp64 or fp32.
    (sgd's float32 variants also take float64 hyperparameters: they are fp32 variants.)"""
    kinds = [k[1:] for k in variant.signature.values() if k in ("*bf16", "*fp16", "*fp32", "*fp64")]
    computes = {str(v) for v in variant.constexprs.values() if str(v) in ("fp32", "fp64") and not isinstance(v, str)}
    return next((k for k in ("bf16", "fp16") if k in kinds), None) or next(
        (k for k in ("fp64", "fp32") if k in computes), None) or next(
        (k for k in ("fp64", "fp32") if k in kinds), "none")


def specializations(variant, captured: dict) -> list[dict]:
    """[{"unit": unit-stride names, "layouts": [layouts that launch so]}] to compile `variant` with."""
    patterns = captured.get(_kernel_key(variant.kernel), [])
    ints = {n for n, kind in variant.signature.items() if kind in ("i32", "i64")}
    # A variant that fixes an argument to 1 itself (a constexpr) takes only launches passing 1.
    fixed = {n for n, v in variant.constexprs.items()
             if type(v) is int and v == 1 and n in variant.kernel.arg_names and _STRIDE_ARG.match(n)}
    patterns = [p for p in patterns if fixed.issubset(p["unit"])]
    # Launches of the variant's own kind: the same switches (bias, mask kind, ...) wherever the
    # cases launched the variant's value somewhere; values no case uses (a head dim of 128) pass.
    launched = collections.defaultdict(set)
    for p in patterns:
        for name, values in p["constexprs"].items():
            launched[name].update(values)
    own = {n: str(v) for n, v in variant.constexprs.items() if str(v) in launched.get(n, ())}
    mine = [p for p in patterns if all(v in p["constexprs"].get(n, (v,)) for n, v in own.items())]
    merged: dict = {}
    for p in mine or patterns:
        key = tuple(n for n in p["unit"] if n in ints)
        merged.setdefault(key, collections.Counter()).update(p["layouts"])
    if not merged:
        return [{"unit": [], "layouts": ["no launch recorded"]}]
    ordered = sorted(merged.items(), key=lambda kv: (-kv[1]["contiguous"], -sum(kv[1].values()), kv[0]))
    if not (is_gemm_like(variant.kernel) and is_half(variant)):
        ordered = ordered[:1]
    return [{"unit": list(unit), "layouts": sorted(counts)} for unit, counts in ordered]


def compile_variant(variant, arch: int, unit=(), inspect=None) -> dict:
    """Compile `variant` for sm_`arch` with the integer arguments in `unit` equal to 1 (constants)
    and every other integer and pointer 16-divisible. `inspect(compiled, arch)` may add fields."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gpudl.kernels._common import SHARED_MEMORY_LIMIT

    start = time.perf_counter()
    record = {"variant": variant.name, "arch": f"sm_{arch}", "num_warps": variant.num_warps,
              "num_stages": variant.num_stages, "unit_strides": list(unit)}
    try:
        names = list(variant.kernel.arg_names)
        signature = dict(variant.signature)
        constexprs = dict(variant.constexprs)
        for name in unit:
            signature[name], constexprs[name] = "constexpr", 1
        attrs = {(names.index(arg),): [["tt.divisibility", 16]]
                 for arg, kind in signature.items() if kind.startswith("*") or kind in ("i32", "i64")}
        compiled = triton.compile(ASTSource(variant.kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
        shared = compiled.metadata.shared
        record.update(shared_bytes=shared, ok=shared <= SHARED_MEMORY_LIMIT[arch])
        if not record["ok"]:
            record["error"] = f"shared memory {shared} B exceeds the sm_{arch} limit of {SHARED_MEMORY_LIMIT[arch]} B"
        if inspect is not None:
            record.update(inspect(compiled, arch))
    except Exception as exc:  # every failure is reported, with its message, as a failed record
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[-2000:]}")
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def compilation_id(op: str, variant: str, arch: int, unit) -> str:
    """The name of one compilation: op, variant, arch and the unit strides it is specialized with."""
    return f"{op}|{variant}|sm_{arch}|{','.join(unit) or '-'}"


def _compile_job(job):
    op, index, arch, spec, audit = job
    from gpudl.kernels import REGISTRY

    inspect = None
    variant = REGISTRY[op].compile_variants()[index]
    if audit:  # "sass": disassemble every compilation; "sass-gemm": the GEMM-like ones, streams and spills
        from gpudl.kernels.audit import STREAM_OPS, inspect_compiled

        sass = audit == "sass" or is_gemm_like(variant.kernel) or op in STREAM_OPS
        inspect = functools.partial(inspect_compiled, sass=sass)
    record = compile_variant(variant, arch, spec["unit"], inspect)
    return {"op": op, "id": compilation_id(op, variant.name, arch, spec["unit"]), **record,
            "kernel": _kernel_key(variant.kernel).rsplit(".", 1)[-1], "role": variant.role,
            "layouts": spec["layouts"], "gemm_like": is_gemm_like(variant.kernel),
            "half": is_half(variant), "dtype": data_dtype(variant),
            "constexprs": {k: str(v) for k, v in variant.constexprs.items()}}


def plan(ops, archs) -> list[dict]:
    """Every compilation of `ops` for `archs`, in order: {"id", "op", "index", "arch", "spec"}
    (spec: the unit strides and the layouts that launch so); ops without variants get
    {"op", "error"}."""
    from gpudl.kernels import REGISTRY

    captured = captured_launches(ops)
    work = []
    for op in ops:
        variants = REGISTRY[op].compile_variants()
        if not variants:
            work.append({"op": op, "error": "the spec lists no compile variants"})
        for i, variant in enumerate(variants):
            for spec in specializations(variant, captured):
                for arch in (a for a in archs if a in variant.archs):
                    work.append({"id": compilation_id(op, variant.name, arch, spec["unit"]), "op": op, "index": i,
                                 "arch": arch, "spec": spec})
    return work


def execute(work, jobs: int, audit: str | None = None, emit=None) -> list[dict]:
    """Compile the `plan` entries in `work` (in `jobs` processes); one record each, in order."""
    records = [{"op": w["op"], "ok": False, "error": w["error"]} for w in work if "error" in w]
    todo = [(w["op"], w["index"], w["arch"], w["spec"], audit) for w in work if "error" not in w]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for record in pool.map(_compile_job, todo):
            records.append(record)
            if emit:
                emit(record)
    return records


def run(ops, archs, jobs: int, audit: str | None = None, emit=None):
    """Compile every variant of `ops` for `archs` (in `jobs` processes); returns the records
    (failures are records with ok False). `emit(record)` sees each record as it arrives."""
    return execute(plan(ops, archs), jobs, audit, emit)


def summary(records) -> str:
    ok = [r for r in records if r.get("ok")]
    line = f"{len(ok)}/{len(records)} compiled"
    if ok:
        top = max(ok, key=lambda r: r["shared_bytes"])
        line += f", largest shared memory {top['shared_bytes']} B ({top['op']} {top['variant']} {top['arch']})"
    failed = [r for r in records if not r.get("ok")]
    if failed:
        names = sorted({f"{r['op']} {r.get('variant', '')} {r.get('arch', '')}" for r in failed})
        line += "; FAILED: " + ", ".join(names)
    return line


def check_ops(ops) -> list[str] | None:
    from gpudl.kernels import REGISTRY

    unknown = [op for op in ops if op not in REGISTRY]
    if unknown:
        print(f"unknown op(s) {unknown}; registered: {sorted(REGISTRY)}", file=sys.stderr)
        return None
    return ops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", help="only these ops (default: every registered op)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--capture", nargs="*", help=argparse.SUPPRESS)  # internal: the interpreter subprocess
    args = parser.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.capture is not None:
        print(json.dumps(capture_launches(args.capture)))
        return 0
    if interpret:
        print("compile_check: unset TRITON_INTERPRET; the interpreter replaces the kernels it compiles",
              file=sys.stderr)
        return 2
    from gpudl.kernels import REGISTRY

    ops = check_ops(args.op or sorted(REGISTRY))
    if ops is None:
        return 2
    records = run(ops, args.arch, args.jobs, emit=lambda r: print(json.dumps(r), flush=True))
    print(summary(records), flush=True)
    return 0 if all(r.get("ok") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

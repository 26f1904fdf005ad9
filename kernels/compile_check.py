"""Compile every registered kernel variant ahead of time for real GPUs, on any machine.

    python -m gpudl.kernels.compile_check [--op OP ...] [--arch 80 90]

Builds each `CompileVariant` of each `KernelSpec` with `triton.compile` for CUDA sm_80 and sm_90
(the bundled ptxas; no GPU needed) and checks its shared memory against the device's limit per
block. It catches what the interpreter cannot: tl.dot shape rules, loop-carried dtype changes,
shared-memory overflow. Must run without TRITON_INTERPRET (the interpreter replaces the
@triton.jit functions); prints one JSON line per compilation and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def compile_variant(variant, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gpudl.kernels._common import SHARED_MEMORY_LIMIT

    start = time.perf_counter()
    record = {"variant": variant.name, "arch": f"sm_{arch}", "num_warps": variant.num_warps, "num_stages": variant.num_stages}
    try:
        # Mark pointers and integer arguments 16-divisible, as a launch with aligned tensors and
        # round sizes specializes them: that enables pipelined loads, so it is the variant that
        # uses the most shared memory.
        names = list(variant.kernel.arg_names)
        attrs = {
            (names.index(arg),): [["tt.divisibility", 16]]
            for arg, kind in variant.signature.items()
            if kind.startswith("*") or kind in ("i32", "i64")
        }
        source = ASTSource(variant.kernel, variant.signature, variant.constexprs, attrs)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        shared = compiled.metadata.shared
        record.update(shared_bytes=shared, ok=shared <= SHARED_MEMORY_LIMIT[arch])
        if not record["ok"]:
            record["error"] = f"shared memory {shared} B exceeds the sm_{arch} limit of {SHARED_MEMORY_LIMIT[arch]} B"
    except Exception as exc:  # every failure is reported, with its message, as a failed record
        record.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[-2000:]}")
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _compile_job(job):
    op, index, arch = job
    from gpudl.kernels import REGISTRY

    return {"op": op, **compile_variant(REGISTRY[op].compile_variants()[index], arch)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", help="only these ops (default: every registered op)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET; the interpreter replaces the kernels it compiles", file=sys.stderr)
        return 2
    from gpudl.kernels import REGISTRY

    ops = args.op or sorted(REGISTRY)
    unknown = [op for op in ops if op not in REGISTRY]
    if unknown:
        print(f"compile_check: unknown op(s) {unknown}; registered: {sorted(REGISTRY)}", file=sys.stderr)
        return 2
    failed = 0
    jobs = []
    for op in ops:
        count = len(REGISTRY[op].compile_variants())
        if not count:
            print(json.dumps({"op": op, "ok": False, "error": "the spec lists no compile variants"}), flush=True)
            failed += 1
        jobs += [(op, i, arch) for i in range(count) for arch in args.arch]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for record in pool.map(_compile_job, jobs):
            failed += not record["ok"]
            print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

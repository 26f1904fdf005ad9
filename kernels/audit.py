"""Audit the compiled sm_80/sm_90 code of every kernel variant, on any machine (no GPU needed).

Usage: python -m gpudl.kernels.audit [--op OP ...] [--arch 80 90] [--out DIR]   (writes DIR/audit.json and DIR/audit.md)

Compiles every variant as the compile check does (gpudl.kernels.compile_check: specialized as the
registry's launches are, unit strides as constants) and reads each cubin with the `cuobjdump`
bundled in the triton wheel: registers per thread, spills (stack bytes, LDL/STL instructions),
shared memory, theoretical occupancy, tensor-core instructions (HMMA, HGMMA), asynchronous copies
(LDGSTS, and the TMA/bulk copies UTMALDG/UBLKCP) and the instruction count (static, NOPs left
out). Every GEMM-like variant (one that calls tl.dot) is set beside `_plain_gemm`, a textbook
tiled Triton GEMM compiled at the same tile, dtype, warps and stages with contiguous operands:
the ratio of its registers and instructions to that baseline's.

Theoretical occupancy = resident warps per SM, the least of what registers, shared memory and
the warp and block limits allow, with the limits of the CUDA C programming guide (compute
capability 8.0 and 9.0, `ARCH_LIMITS`): registers allocated per warp in units of 256, shared
memory per block plus 1 KiB reserved by the system.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
import triton.language as tl

from gpudl.kernels import compile_check  # also sets TRITON_DEFAULT_FP_FUSION, read when a kernel compiles

ARCH_LIMITS = {
    80: {"registers_per_sm": 65536, "max_warps_per_sm": 64, "max_blocks_per_sm": 32,
         "shared_per_sm": 167936, "reserved_shared_per_block": 1024, "register_unit_per_warp": 256},
    90: {"registers_per_sm": 65536, "max_warps_per_sm": 64, "max_blocks_per_sm": 32,
         "shared_per_sm": 233472, "reserved_shared_per_block": 1024, "register_unit_per_warp": 256},
}
ASYNC_COPIES = ("LDGSTS", "UTMALDG", "UBLKCP")


@triton.jit
def _plain_gemm(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                ACC: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The textbook tiled GEMM: C = A @ B, one [BLOCK_M, BLOCK_N] tile per program, masked edges."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _cuobjdump(*args) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], capture_output=True, text=True, check=True).stdout


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident warps per SM and what limits them."""
    lim = ARCH_LIMITS[arch]
    unit = lim["register_unit_per_warp"]
    per_warp = -(-max(registers, 1) * 32 // unit) * unit
    blocks = {
        "registers": (lim["registers_per_sm"] // per_warp) // num_warps,
        "shared": lim["shared_per_sm"] // (shared + lim["reserved_shared_per_block"]),
        "warps": lim["max_warps_per_sm"] // num_warps,
        "blocks": lim["max_blocks_per_sm"],
    }
    limiter = min(blocks, key=blocks.get)
    warps = blocks[limiter] * num_warps
    return {"warps_per_sm": warps, "occupancy": round(warps / lim["max_warps_per_sm"], 3), "occupancy_limit": limiter}


def inspect_compiled(compiled, arch: int, sass: bool = True) -> dict:
    """What the cubin of a compiled kernel uses and does (see the module docstring). With
    sass=False the disassembly (a third of the audit's time) is read only if the kernel spills;
    its instruction counts are then None."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = _cuobjdump("-res-usage", f.name)
        fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[-1]))
        # Every spill seen so far shows in STACK or LOCAL bytes (108 of 108 in the first audit).
        spills = int(fields.get("STACK", 0)) or int(fields.get("LOCAL", 0))
        disassembly = _cuobjdump("-sass", f.name) if sass or spills else None
    registers = int(fields.get("REG", 0))
    shared = compiled.metadata.shared + int(fields.get("SHARED", 0))
    resources = {"registers": registers, "stack_bytes": int(fields.get("STACK", 0)),
                 "local_bytes": int(fields.get("LOCAL", 0)), "shared_total": shared,
                 **occupancy(registers, shared, compiled.metadata.num_warps, arch)}
    if disassembly is None:
        counted = ("ldl", "stl", "hmma", "hgmma", "async_copies", "ldgsts", "tma", "instructions")
        return {**resources, **dict.fromkeys(counted)}
    sass = disassembly
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    count = lambda name: sum(op == name for op in opcodes)  # noqa: E731
    return {
        **resources, "ldl": count("LDL"), "stl": count("STL"), "hmma": count("HMMA"), "hgmma": count("HGMMA"),
        "async_copies": sum(count(op) for op in ASYNC_COPIES), "ldgsts": count("LDGSTS"),
        "tma": count("UTMALDG") + count("UBLKCP"), "instructions": sum(op != "NOP" for op in opcodes),
    }


# --------------------------------------------------------------------------- baseline
def gemm_tile(record: dict) -> tuple[int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM-like record; attention's K is its head-dim block."""
    c = record.get("constexprs", {})
    if not record.get("gemm_like") or "BLOCK_M" not in c or "BLOCK_N" not in c:
        return None
    k = c.get("BLOCK_K", c.get("BLOCK_D"))
    return None if k is None else (int(c["BLOCK_M"]), int(c["BLOCK_N"]), int(k))


def baseline_key(record: dict):
    tile = gemm_tile(record)
    if tile is None or not record.get("ok"):
        return None
    c = record["constexprs"]
    precision = c.get("INPUT_PRECISION", c.get("PRECISION", "ieee"))
    dtype = record["dtype"]
    precision = "ieee" if dtype != "fp32" else precision
    return (int(record["arch"][3:]), dtype, precision, *tile, record["num_warps"], record["num_stages"])


def _compile_baseline(key) -> dict:
    from gpudl.kernels.registry import CompileVariant

    arch, dtype, precision, bm, bn, bk, warps, stages = key
    ptr = f"*{dtype}"
    signature = {"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, **{n: "i32" for n in _plain_gemm.arg_names[3:12]},
                 "ACC": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                 "BLOCK_K": "constexpr"}
    acc = tl.float64 if dtype == "fp64" else tl.float32
    name = f"plain_gemm-{dtype}-{precision}-{bm}x{bn}x{bk}-w{warps}-s{stages}"
    constexprs = {"ACC": acc, "PRECISION": precision, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    variant = CompileVariant(name, _plain_gemm, signature, constexprs, warps, stages)
    return compile_check.compile_variant(variant, arch, ("stride_ak", "stride_bn", "stride_cn"), inspect_compiled)


# --------------------------------------------------------------------------- report
def audit(ops, archs, jobs: int, emit=None, sass: str = "all") -> dict:
    """sass "all" disassembles every compilation; "gemm" only the GEMM-like ones and those that
    spill, which is all the rules in tests/test_audit.py read."""
    records = compile_check.run(ops, archs, jobs, audit="sass" if sass == "all" else "sass-gemm", emit=emit)
    keys = sorted({k for k in map(baseline_key, records) if k is not None})
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        baselines = dict(zip(keys, pool.map(_compile_baseline, keys)))
    for record in records:
        base = baselines.get(baseline_key(record))
        if base and base.get("ok"):
            record["baseline"] = base["variant"]
            record["registers_vs_baseline"] = round(record["registers"] / max(base["registers"], 1), 2)
            record["instructions_vs_baseline"] = round(record["instructions"] / max(base["instructions"], 1), 2)
    return {"arch_limits": ARCH_LIMITS, "records": records, "baselines": list(baselines.values()),
            "triton": triton.__version__}


def markdown(report: dict) -> str:
    head = ("| op | variant | unit strides (layouts) | arch | warps/stages | regs | spill B / LDL / STL | smem B "
            "| warps/SM (limit) | HMMA / HGMMA | async copies | instr | regs, instr vs plain GEMM |")
    lines = [head, "|" + "---|" * 13]
    for r in report["records"] + [dict(b, op="baseline") for b in report["baselines"]]:
        r = {k: ("-" if v is None else v) for k, v in r.items()}
        if not r.get("ok"):
            lines.append(f"| {r['op']} | {r.get('variant', '')} | | {r.get('arch', '')} | | FAILED: "
                         f"{r.get('error', '')[:80]} | | | | | | | |")
            continue
        ratio = (f"{r['registers_vs_baseline']}x, {r['instructions_vs_baseline']}x"
                 if "registers_vs_baseline" in r else "")
        lines.append(
            f"| {r['op']} | {r['variant']} | {','.join(r['unit_strides']) or '-'} ({','.join(r.get('layouts', []))}) "
            f"| {r['arch']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} "
            f"| {r['stack_bytes'] + r['local_bytes']} / {r['ldl']} / {r['stl']} | {r['shared_total']} "
            f"| {r['warps_per_sm']} ({r['occupancy_limit']}) | {r['hmma']} / {r['hgmma']} | {r['async_copies']} "
            f"| {r['instructions']} | {ratio} |")
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    records = report["records"]
    ok = [r for r in records if r.get("ok")]
    spilling = [r for r in ok if r["stack_bytes"] or r["local_bytes"] or r["ldl"] or r["stl"]]
    return (f"{compile_check.summary(records)}; audit: {len(spilling)} of {len(ok)} compilations spill, "
            f"{len(report['baselines'])} plain-GEMM baselines")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", help="only these ops (default: every registered op)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--out", type=Path, help="output folder (default bench_results/audit/<UTC date>)")
    parser.add_argument("--sass", choices=["all", "gemm"], default="all",
                        help="disassemble every compilation, or only GEMM-like and spilling ones (the CI test)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("audit: unset TRITON_INTERPRET; the interpreter replaces the kernels it compiles", file=sys.stderr)
        return 2
    from gpudl.kernels import REGISTRY

    ops = compile_check.check_ops(args.op or sorted(REGISTRY))
    if ops is None:
        return 2
    out = args.out or Path("bench_results/audit") / datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    report = audit(ops, args.arch, args.jobs, sass=args.sass)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, separators=(",", ":"), default=str) + "\n")
    (out / "audit.md").write_text(markdown(report))
    print(summary(report))
    print(f"wrote {out / 'audit.json'} and {out / 'audit.md'}")
    return 0 if all(r.get("ok") for r in report["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())

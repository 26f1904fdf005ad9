"""Audit the compiled sm_80/sm_90 code of every kernel variant, on any machine (no GPU needed).

    python -m gpudl.kernels.audit --op conv2d [--arch 90] [--variant dgrad]   one op, printed
    python -m gpudl.kernels.audit --record bench_results/audit/current        refresh the record
    python -m gpudl.kernels.audit --check bench_results/audit/current         what CI runs
    python -m gpudl.kernels.audit --out DIR                                   everything, afresh

Compiles every variant as the compile check does (gpudl.kernels.compile_check: specialized as the
registry's launches are, unit strides as constants) and reads each cubin with the `cuobjdump`
bundled in the triton wheel: registers per thread, spills (stack bytes, LDL/STL instructions),
shared memory, theoretical occupancy, tensor-core instructions (HMMA, HGMMA), asynchronous copies
(LDGSTS, and the TMA/bulk copies UTMALDG/UBLKCP), the instruction count (static, NOPs left out),
the width of every global load and store, and for kernels with tensor-core instructions the hot
loop and its modeled bound on tensor-core use (gpudl.kernels._audit_sass: a model, an upper bound
that sees instruction issue and not memory stalls). Every GEMM-like variant (one that calls
tl.dot) is set beside a textbook kernel compiled at the same tile, dtype, warps and stages
(gpudl.kernels._audit_baselines): the plain tiled GEMM, and for attention the textbook
flash-attention forward or backward kernel of the same role.

The record (`--record DIR` writes DIR/audit.json and DIR/audit.md) keeps every compilation's
figures under a key hashing what they depend on (gpudl.kernels._audit_record). A refresh, and
the CI check, recompile only what has no figures under its current key, plus (`--check`) a fixed
sample that is always recompiled and compared with its recorded figures; `--full` recompiles
everything.

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
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton

# compile_check also sets TRITON_DEFAULT_FP_FUSION, read when a kernel compiles.
from gpudl.kernels import _audit_baselines, _audit_record, _audit_sass, compile_check
from gpudl.kernels._audit_baselines import _plain_gemm  # noqa: F401 - the baseline's historical home

ARCH_LIMITS = {
    80: {"registers_per_sm": 65536, "max_warps_per_sm": 64, "max_blocks_per_sm": 32,
         "shared_per_sm": 167936, "reserved_shared_per_block": 1024, "register_unit_per_warp": 256},
    90: {"registers_per_sm": 65536, "max_warps_per_sm": 64, "max_blocks_per_sm": 32,
         "shared_per_sm": 233472, "reserved_shared_per_block": 1024, "register_unit_per_warp": 256},
}
ASYNC_COPIES = ("LDGSTS", "UTMALDG", "UBLKCP")
GEMM_FAMILY = ("conv2d", "conv_transpose2d", "linear", "scaled_dot_product_attention", "rnn")
# Memory-bound kernels whose contiguous streams must use 128-bit global accesses.
STREAM_OPS = ("binary_cross_entropy_with_logits", "mse_loss", "cross_entropy", "layer_norm", "sgd_step",
              "max_pool2d")
# One-program kernels that fold a reduction's partials into its scalar results: no stream to vectorize.
ONE_PROGRAM_FINALIZERS = ("_ce_finalize_kernel", "_sum_partials_kernel")
HOT_LOOP_RULE = 0.8  # a half-precision GEMM-family bound >= 0.8x its textbook baseline's
# Always recompiled by --check and compared with the record: (op, arch, what the variant is).
SAMPLE = (("linear", 90, "gemm"), ("rnn", 80, "gemm"), ("layer_norm", 80, ""))
SAMPLE_FIGURES = ("ok", "registers", "stack_bytes", "shared_total", "instructions", "hmma", "hgmma", "hot_loop",
                  "global_widths")


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
        counted = ("ldl", "stl", "hmma", "hgmma", "async_copies", "ldgsts", "tma", "instructions", "hot_loop",
                   "global_widths")
        return {**resources, **dict.fromkeys(counted)}
    sass = disassembly
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    count = lambda name: sum(op == name for op in opcodes)  # noqa: E731
    return {
        **resources, "ldl": count("LDL"), "stl": count("STL"), "hmma": count("HMMA"), "hgmma": count("HGMMA"),
        "async_copies": sum(count(op) for op in ASYNC_COPIES), "ldgsts": count("LDGSTS"),
        "tma": count("UTMALDG") + count("UBLKCP"), "instructions": sum(op != "NOP" for op in opcodes),
        "hot_loop": _audit_sass.hot_loop(sass, compiled.metadata.num_warps, arch),
        "global_widths": _audit_sass.global_access_widths(sass),
    }


# --------------------------------------------------------------------------- roles and baselines
def role(record: dict) -> str:
    """What a GEMM-like record is compared with: the variant's own `role`, else "attention_fwd",
    "attention_bwd_dkdv" or "attention_bwd_dq" for attention kernels named so, else "gemm"."""
    if record.get("role"):
        return record["role"]
    if not record.get("gemm_like"):
        return ""
    name = record.get("kernel", record.get("variant", "")).lower()
    if record["op"] == "scaled_dot_product_attention" or "attn" in name or "attention" in name:
        for key, found in (("dkdv", "attention_bwd_dkdv"), ("dq", "attention_bwd_dq"), ("fwd", "attention_fwd")):
            if key in name:
                return found
    return "gemm"


def gemm_tile(record: dict) -> tuple[int, int, int] | None:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM-like record: attention's K is its head-dim block; the
    RNN's tile is batch rows BLOCK_N by hidden BLOCK_H, over BLOCK_H (W_hh resident) or BLOCK_K."""
    c = record.get("constexprs", {})
    if not record.get("gemm_like"):
        return None
    if "BLOCK_H" in c and "BLOCK_N" in c:
        k = c["BLOCK_H"] if c.get("RESIDENT") == "True" else c.get("BLOCK_K")
        return None if k is None else (int(c["BLOCK_N"]), int(c["BLOCK_H"]), int(k))
    if "BLOCK_M" not in c or "BLOCK_N" not in c:
        return None
    k = c.get("BLOCK_K", c.get("BLOCK_D", c.get("HEAD_DIM")))
    return None if k is None else (int(c["BLOCK_M"]), int(c["BLOCK_N"]), int(k))


def baseline_request(record: dict) -> tuple | None:
    """The plain GEMM the record is set beside: (kind, arch, dtype, precision, tile, warps, stages)."""
    tile = gemm_tile(record)
    if tile is None or not record.get("ok"):
        return None
    c = record["constexprs"]
    dtype = record["dtype"]
    precision = c.get("INPUT_PRECISION", c.get("PRECISION", "ieee")) if dtype == "fp32" else "ieee"
    return ("gemm", int(record["arch"][3:]), dtype, precision, tile, record["num_warps"], record["num_stages"])


def textbook_request(record: dict) -> tuple | None:
    """The textbook attention kernel a half-precision attention record is set beside."""
    kind = role(record)
    tile = gemm_tile(record)
    if kind not in _audit_baselines.ATTENTION or tile is None or not record.get("half") or not record.get("ok"):
        return None
    causal = record["constexprs"].get("IS_CAUSAL", record["constexprs"].get("CAUSAL")) == "True"
    return (kind, int(record["arch"][3:]), record["dtype"], causal, tile[2], tile[0], tile[1], record["num_warps"],
            record["num_stages"])


def _baseline_variant(request):
    if request[0] == "gemm":
        _, arch, dtype, precision, tile, warps, stages = request
        return arch, *_audit_baselines.plain_gemm_variant(dtype, precision, tile, warps, stages)
    kind, arch, dtype, causal, head_dim, bm, bn, warps, stages = request
    return arch, *_audit_baselines.attention_variant(kind, dtype, causal, head_dim, bm, bn, warps, stages)


def _baseline_identity(request) -> tuple[str, str]:
    arch, variant, unit = _baseline_variant(request)
    return f"baseline|{variant.name}|sm_{arch}", _audit_record.compilation_key(variant, arch, unit)


def _compile_baseline(request) -> dict:
    arch, variant, unit = _baseline_variant(request)
    record = compile_check.compile_variant(variant, arch, unit, inspect_compiled)
    ident, key = _baseline_identity(request)
    return {**record, "id": ident, "key": key, "op": "baseline"}


# --------------------------------------------------------------------------- rules
def hot_loop_verdict(record: dict, baselines: dict) -> tuple[str, float | None]:
    """("ok" | "FAIL: why" | "" where no rule applies, bound / baseline bound). The rule: every
    half-precision GEMM-family variant's bound >= HOT_LOOP_RULE x the plain GEMM's at its tile
    and warps/stages; attention forward (no mask, or causal) against the textbook forward;
    attention backward and masked forwards are reported, not ruled."""
    if record.get("op") not in GEMM_FAMILY or not record.get("gemm_like") or not record.get("ok"):
        return "", None
    kind = role(record)
    attention = kind.startswith("attention")
    base = baselines.get(record.get("textbook" if attention else "baseline"))
    loop = record.get("hot_loop") or {}
    ratio = None
    if loop.get("bound") and base and (base.get("hot_loop") or {}).get("bound"):
        ratio = round(loop["bound"] / base["hot_loop"]["bound"], 3)
    masked = record["constexprs"].get("MASK_KIND", "0") not in ("0", "none", "None")
    if not record.get("half") or kind in ("attention_bwd_dkdv", "attention_bwd_dq") or (attention and masked):
        return "", ratio
    if not loop:
        return "FAIL: no loop holds a tensor-core instruction", None
    if loop.get("bound") is None:
        return "FAIL: the hot loop's tensor-core rate is unknown (" + loop.get("mma_input", "") + ")", None
    if ratio is None:
        return "FAIL: no baseline bound at this tile", None
    return ("ok" if ratio >= HOT_LOOP_RULE else f"FAIL: {ratio} < {HOT_LOOP_RULE}"), ratio


def stream_verdict(record: dict) -> str:
    """"ok" | "FAIL: why" | "" where no rule applies: a memory-bound kernel compiled for a
    contiguous launch (16-byte aligned pointers) loads and stores its streams 128 bits at a
    time. Applies to STREAM_OPS' records launched contiguous (or channels_last, max_pool2d's
    stream layout: NCHW pooling gathers windows); a kernel with vector or several global stores
    must have a 128-bit one."""
    if record.get("op") not in STREAM_OPS or not record.get("ok") or record.get("global_widths") is None:
        return ""
    if record.get("kernel", "").rsplit(".", 1)[-1] in ONE_PROGRAM_FINALIZERS:
        return ""
    layouts = set(record.get("layouts", []))
    stream_layout = "channels_last" if record["op"] == "max_pool2d" else "contiguous"
    if stream_layout not in layouts:
        return ""
    widths = record["global_widths"]
    loads, stores = ({int(k): v for k, v in widths[side].items()} for side in ("load", "store"))
    problems = []
    if loads and 128 not in loads:
        problems.append(f"no 128-bit load (widths {sorted(loads)})")
    # One scalar store (a reduction's result) is no stream; a narrower vector store is.
    if stores and 128 not in stores and (max(stores) >= 64 or sum(stores.values()) > 1):
        problems.append(f"no 128-bit store (widths {sorted(stores)})")
    return "FAIL: " + "; ".join(problems) if problems else "ok"


# --------------------------------------------------------------------------- the audit
def _variants(ops):
    from gpudl.kernels import REGISTRY

    return {op: REGISTRY[op].compile_variants() for op in ops}


def _sample_ids(work, variants) -> set[str]:
    ids = set()
    for op, arch, kind in SAMPLE:
        for w in sorted((w for w in work if w.get("op") == op and w["arch"] == arch and "id" in w),
                        key=lambda w: w["id"]):
            v = variants[op][w["index"]]
            guess = role({"op": op, "role": v.role, "gemm_like": compile_check.is_gemm_like(v.kernel),
                          "kernel": compile_check._kernel_key(v.kernel).rsplit(".", 1)[-1]})
            if guess == kind and (not kind or compile_check.is_half(v)):
                ids.add(w["id"])
                break
    return ids


def audit(ops, archs, jobs: int, emit=None, sass: str = "all", record: dict | None = None,
          check_sample: bool = False, variant_filter: str | None = None, reuse_variants: bool = True) -> dict:
    """Compile (or take from `record` where its key still matches) every variant of `ops` for
    `archs`, set each beside its baselines, and return the report. sass "all" disassembles every
    compilation; "gemm" only the GEMM-like ones, the streams and those that spill (what the rules
    read). check_sample: recompile SAMPLE even where recorded, and compare. reuse_variants False:
    take only the baselines from `record`."""
    start = time.perf_counter()
    variants = _variants(ops)
    work = compile_check.plan(ops, archs)
    if variant_filter:
        work = [w for w in work if "id" not in w or variant_filter in w["id"]]
    for w in work:
        if "id" in w:
            w["key"] = _audit_record.compilation_key(variants[w["op"]][w["index"]], w["arch"], w["spec"]["unit"])
    kept = {r["id"]: r for r in (record or {}).get("records", []) if "id" in r and "key" in r and reuse_variants}
    sample = _sample_ids(work, variants) if check_sample else set()
    todo = [w for w in work if "id" not in w or w["id"] in sample or kept.get(w["id"], {}).get("key") != w["key"]]
    mode = "sass" if sass == "all" else "sass-gemm"
    keys = {w["id"]: w["key"] for w in work if "id" in w}
    fresh = {}
    for r in compile_check.execute(todo, jobs, audit=mode, emit=emit):
        if "id" in r:
            r["key"] = keys[r["id"]]
            fresh[r["id"]] = r
        else:
            fresh[f"{r['op']}|error"] = r
    records = [fresh.get(w["id"]) or kept[w["id"]] if "id" in w else fresh[f"{w['op']}|error"] for w in work]
    for w, r in zip(work, records):
        if "id" in w:  # the launches (host code) decide the layouts; they are not in the key
            r["layouts"] = w["spec"]["layouts"]
    stale = {
        "changed": sorted(w["id"] for w in work if "id" in w and w["id"] in kept and kept[w["id"]]["key"] != w["key"]),
        "missing": sorted(w["id"] for w in work if "id" in w and w["id"] not in kept),
        "orphaned": sorted(i for i, r in kept.items() if r.get("op") in ops and i not in keys and any(
            i.split("|")[2] == f"sm_{a}" for a in archs)) if not variant_filter else [],
    }
    mismatches = []
    for i in sorted(sample):
        if i in kept and kept[i]["key"] == keys[i]:
            diff = [f for f in SAMPLE_FIGURES if json.dumps(kept[i].get(f), sort_keys=True)
                    != json.dumps(json.loads(json.dumps(fresh[i].get(f))), sort_keys=True)]
            if diff:
                mismatches.append(f"{i}: {', '.join(diff)} differ from the record")

    # Baselines: the plain GEMM (and textbook attention) at every tile the records use.
    requests = {}
    for r in records:
        for field, request in (("baseline", baseline_request(r)), ("textbook", textbook_request(r))):
            if request is not None:
                ident, key = _baseline_identity(request)
                requests.setdefault(request, (ident, key))
                r[field] = ident
    kept_base = {b["id"]: b for b in (record or {}).get("baselines", []) if "id" in b and "key" in b}
    sample_base = {r.get(f) for r in records if r["id"] in sample for f in ("baseline", "textbook")} - {None}
    base_todo = [q for q, (i, k) in requests.items() if i in sample_base or kept_base.get(i, {}).get("key") != k]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        fresh_base = {b["id"]: b for b in pool.map(_compile_baseline, base_todo)}
    for i in sorted(sample_base):
        if i in kept_base and i in fresh_base and kept_base[i]["key"] == fresh_base[i]["key"]:
            diff = [f for f in SAMPLE_FIGURES if json.dumps(kept_base[i].get(f), sort_keys=True)
                    != json.dumps(json.loads(json.dumps(fresh_base[i].get(f))), sort_keys=True)]
            if diff:
                mismatches.append(f"{i}: {', '.join(diff)} differ from the record")
    baselines = {i: fresh_base.get(i) or kept_base[i] for i, _ in requests.values()}
    stale["changed"] += sorted(i for q, (i, k) in requests.items() if i in kept_base and kept_base[i]["key"] != k)
    stale["missing"] += sorted(i for q, (i, k) in requests.items() if i not in kept_base)

    for r in records:
        base = baselines.get(r.get("baseline"))
        if base and base.get("ok") and r.get("ok") and r.get("registers") and r.get("instructions"):
            r["registers_vs_baseline"] = round(r["registers"] / max(base["registers"], 1), 2)
            r["instructions_vs_baseline"] = round(r["instructions"] / max(base["instructions"] or 1, 1), 2)
        r["hot_loop_rule"], r["bound_vs_baseline"] = hot_loop_verdict(r, baselines)
        r["stream_rule"] = stream_verdict(r)
    return {"arch_limits": ARCH_LIMITS, "triton": triton.__version__, "model": _audit_sass.MODEL_NOTE,
            "records": records, "baselines": sorted(baselines.values(), key=lambda b: b["id"]),
            "recompiled": sorted(fresh), "sample": sorted(sample), "sample_mismatches": mismatches, "stale": stale,
            "seconds": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------------- report
def _dash(v):
    return "-" if v is None or v == "" else v


def _span(values) -> str:
    values = sorted(v for v in values if v is not None)
    if not values:
        return "-"
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def kernel_summary(report: dict) -> list[str]:
    """Markdown rows: per GEMM-family kernel, arch and half-precision dtype, the spans over its
    compilations of the hot loop's instructions, the bound, the baseline's bound and the ratio,
    and how many compilations fail the rule."""
    by_id = {b["id"]: b for b in report["baselines"]}
    groups: dict = {}
    for r in report["records"]:
        if r.get("op") in GEMM_FAMILY and r.get("half") and r.get("hot_loop"):
            groups.setdefault((r["op"], r.get("kernel", ""), r["arch"], r["dtype"]), []).append(r)
    rows = ["| op | kernel | arch | dtype | compilations | loop instructions | tensor | bound | baseline bound "
            "| vs baseline | rule fails |", "|" + "---|" * 11]
    for (op, kernel, arch, dtype), rs in sorted(groups.items()):
        base = [(by_id.get(r.get("textbook") or r.get("baseline") or "") or {}).get("hot_loop") or {} for r in rs]
        fails = sum(str(r.get("hot_loop_rule", "")).startswith("FAIL") for r in rs)
        ruled = sum(bool(r.get("hot_loop_rule")) for r in rs)
        loop = lambda field: _span(r["hot_loop"][field] for r in rs)  # noqa: E731
        verdict = f"{fails}/{ruled}" if ruled else "no rule"
        rows.append(f"| {op} | {kernel} | {arch} | {dtype} | {len(rs)} | {loop('instructions')} | {loop('tensor')} "
                    f"| {loop('bound')} | {_span(b.get('bound') for b in base)} "
                    f"| {_span(r.get('bound_vs_baseline') for r in rs)} | {verdict} |")
    return rows


def markdown(report: dict) -> str:
    by_id = {b["id"]: b for b in report["baselines"]}
    out = ["# Compiled-code audit (static: sm_80/sm_90 cubins read without a GPU)", "",
           f"triton {report['triton']}. Hot-loop bounds are a {report['model']}.", "",
           "## Hot-loop model per GEMM-family kernel (half precision)", "",
           "Spans over each kernel's compilations (configs, launch layouts); the baseline is the plain GEMM, or for "
           "attention the textbook flash-attention kernel, at the same tile, warps and stages.", "",
           *kernel_summary(report), "",
           "## Hot loops of the GEMM-family kernels", "",
           "Per iteration of the loop holding the tensor-core instructions: instructions by class, multiply-adds "
           "(MACs), tensor-core / issue / MUFU cycles, and the modeled bound on tensor-core use (which of the three "
           "limits it). `vs base` = bound / the textbook baseline's bound at the same tile, warps and stages "
           f"(plain GEMM; attention: textbook flash attention); the rule asks >= {HOT_LOOP_RULE} of half-precision "
           "variants (attention backward and masked forwards: reported only).", "",
           "| op | variant | arch | w/s | instr | tensor | global | shared | async | int | float | MUFU | sync "
           "| branch | other | MACs | TC cyc | issue cyc | MUFU cyc | bound (limit) | baseline: bound | vs base "
           "| rule |",
           "|" + "---|" * 23]
    rows = [r for r in report["records"] if r.get("hot_loop")]
    for r in rows + [dict(b, op="baseline") for b in report["baselines"] if b.get("hot_loop")]:
        h = r["hot_loop"]
        base = by_id.get(r.get("textbook") or r.get("baseline") or "")
        base_txt = f"{base['variant']}: {_dash((base.get('hot_loop') or {}).get('bound'))}" if base else "-"
        counts = " | ".join(str(h[c]) for c in _audit_sass.CLASSES)
        out.append(f"| {r['op']} | {r['variant']} | {r['arch']} | {r['num_warps']}/{r['num_stages']} "
                   f"| {h['instructions']} | {counts} | {h['macs']} | {_dash(h['tensor_cycles'])} "
                   f"| {h['issue_cycles']} | {h['mufu_cycles']} | {_dash(h['bound'])} ({_dash(h['limit'])}) "
                   f"| {base_txt} | {_dash(r.get('bound_vs_baseline'))} | {_dash(r.get('hot_loop_rule'))} |")
    out += ["", "## Global access widths of the memory-bound kernels", "",
            "Global loads and stores by width in bits (count of instructions in the kernel); the rule asks a "
            "contiguous launch (channels_last for max_pool2d) of these kernels for 128-bit accesses.", "",
            "| op | kernel | variant | arch | layouts | loads (bits: n) | stores (bits: n) | rule |", "|" + "---|" * 8]
    for r in report["records"]:
        if r.get("op") in STREAM_OPS and r.get("global_widths"):
            w = r["global_widths"]
            fmt = lambda d: ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))) or "-"  # noqa: E731
            out.append(f"| {r['op']} | {r.get('kernel', '')} | {r['variant']} | {r['arch']} | "
                       f"{','.join(r.get('layouts', []))} | {fmt(w['load'])} | {fmt(w['store'])} "
                       f"| {_dash(r.get('stream_rule'))} |")
    out += ["", "## Every compilation", "",
            "| op | variant | unit strides (layouts) | arch | warps/stages | regs | spill B / LDL / STL | smem B "
            "| warps/SM (limit) | HMMA / HGMMA | async copies | instr | regs, instr vs plain GEMM |", "|" + "---|" * 13]
    for r in report["records"] + [dict(b, op="baseline") for b in report["baselines"]]:
        r = {k: ("-" if v is None else v) for k, v in r.items()}
        if not r.get("ok") or r.get("ok") == "-":
            out.append(f"| {r['op']} | {r.get('variant', '')} | | {r.get('arch', '')} | | FAILED: "
                       f"{str(r.get('error', ''))[:80]} | | | | | | | |")
            continue
        ratio = (f"{r['registers_vs_baseline']}x, {r['instructions_vs_baseline']}x"
                 if "registers_vs_baseline" in r else "")
        out.append(
            f"| {r['op']} | {r['variant']} | {','.join(r['unit_strides']) or '-'} ({','.join(r.get('layouts', []))}) "
            f"| {r['arch']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} "
            f"| {r['stack_bytes'] + r['local_bytes']} / {r['ldl']} / {r['stl']} | {r['shared_total']} "
            f"| {r['warps_per_sm']} ({r['occupancy_limit']}) | {r['hmma']} / {r['hgmma']} | {r['async_copies']} "
            f"| {r['instructions']} | {ratio} |")
    return "\n".join(out) + "\n"


def staleness(report: dict) -> str | None:
    """The one line CI prints when the record does not match the code, else None."""
    stale = report["stale"]
    n = sum(len(v) for v in stale.values())
    if not n:
        return None
    first = next(i for v in stale.values() for i in v)
    what = ", ".join(f"{len(v)} {k}" for k, v in stale.items() if v)
    return (f"the audit record is stale ({what}; first: {first}): refresh it with "
            f"`{_audit_record.REFRESH_COMMAND}` and commit {_audit_record.REFRESH_DIR}")


def summary(report: dict) -> str:
    records = report["records"]
    ok = [r for r in records if r.get("ok")]
    spilling = [r for r in ok if r.get("stack_bytes") or r.get("local_bytes") or r.get("ldl") or r.get("stl")]
    failing = [r for r in records if str(r.get("hot_loop_rule", "")).startswith("FAIL")]
    streams = [r for r in records if str(r.get("stream_rule", "")).startswith("FAIL")]
    return (f"{compile_check.summary(records)}; audit: {len(spilling)} of {len(ok)} compilations spill, "
            f"{len(report['baselines'])} baselines, {len(report['recompiled'])} compiled now, "
            f"hot-loop rule fails {len(failing)}, 128-bit rule fails {len(streams)}, {report['seconds']} s")


def hot_loop_lines(report: dict) -> list[str]:
    """One line per hot loop (for a terminal), with the model's caveat."""
    by_id = {b["id"]: b for b in report["baselines"]}
    lines = [f"# {report['model']}"]
    for r in report["records"]:
        h = r.get("hot_loop")
        if not h:
            continue
        base = by_id.get(r.get("textbook") or r.get("baseline") or "") or {}
        bb = (base.get("hot_loop") or {}).get("bound")
        lines.append(f"{r['id']} w{r['num_warps']}/s{r['num_stages']}: "
                     f"{h['instructions']} instr ({h['tensor']} tensor, {h['integer']} int, {h['float']} float, "
                     f"{h['mufu']} MUFU), bound {h['bound']} ({h['limit']}); {base.get('variant', 'no baseline')} "
                     f"{bb}; {r.get('hot_loop_rule') or 'no rule'}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", help="only these ops (default: every registered op)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--out", type=Path, help="output folder (default bench_results/audit/<UTC date>)")
    parser.add_argument("--variant", help="only compilations whose id (op|variant|arch|unit) contains this")
    parser.add_argument("--sass", choices=["all", "gemm"],
                        help="disassemble every compilation, or only GEMM-like, stream and spilling ones (what "
                             "the rules read; the default of --record and --check), default all")
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="refresh the record in DIR: recompile what changed (every op, or --op's)")
    parser.add_argument("--check", type=Path, metavar="DIR",
                        help="CI: compare the code with the record in DIR (recompiling what changed and a "
                             "fixed sample); exit 1 with one line when the record is stale")
    parser.add_argument("--full", action="store_true",
                        help="recompile everything (by default --record and --check reuse the record's figures "
                             "where keys match, and a plain run reuses the committed record's baselines)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("audit: unset TRITON_INTERPRET; the interpreter replaces the kernels it compiles", file=sys.stderr)
        return 2
    from gpudl.kernels import REGISTRY

    ops = compile_check.check_ops(args.op or sorted(REGISTRY))
    if ops is None:
        return 2
    base = args.record or args.check
    # A plain run reuses the committed record's baselines (the checkout's, wherever it runs from).
    committed = Path(__file__).resolve().parent.parent / _audit_record.REFRESH_DIR
    record = None if args.full else _audit_record.load(base or committed)
    if args.check and record is None:
        print(f"audit: no record in {args.check}; write one with `{_audit_record.REFRESH_COMMAND}`", file=sys.stderr)
        return 2
    sass = args.sass or ("gemm" if base else "all")
    report = audit(ops, args.arch, args.jobs, sass=sass, record=record, check_sample=bool(args.check),
                   variant_filter=args.variant, reuse_variants=bool(base))
    out = args.out or args.record or (
        Path("bench_results/audit") / datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    if args.record and args.op and record is not None:  # refresh only these ops: keep the others' entries
        report["records"] += [r for r in record["records"] if r.get("op") not in ops]
        ids = {b["id"] for b in report["baselines"]}
        used = {r.get(f) for r in report["records"] for f in ("baseline", "textbook")}
        report["baselines"] += [b for b in record.get("baselines", []) if b["id"] not in ids and b["id"] in used]
    saved = report
    if args.record:  # the record keeps the figures, not this run's bookkeeping
        saved = {k: v for k, v in report.items() if k not in ("recompiled", "sample", "sample_mismatches", "stale")}
        saved["refresh_command"] = _audit_record.REFRESH_COMMAND
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(_audit_record.dump(saved))
    (out / "audit.md").write_text(markdown(report))
    if args.op and not args.record:
        print("\n".join(hot_loop_lines(report)))
    print(summary(report))
    print(f"wrote {out / 'audit.json'} and {out / 'audit.md'}")
    if args.check:
        line = staleness(report)
        for problem in report["sample_mismatches"]:
            print(f"audit: {problem}")
        if line:
            print(line)
        return 1 if line or report["sample_mismatches"] else 0
    return 0 if all(r.get("ok") for r in report["records"]) else 1


if __name__ == "__main__":
    sys.exit(main())

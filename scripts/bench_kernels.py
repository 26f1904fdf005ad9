"""Benchmark every registered gpudl kernel against PyTorch, side by side, in one run.

    python scripts/bench_kernels.py [--quick] [--ops OP ...] [--dtype bf16|fp16|fp32] [--out DIR]
    python scripts/bench_kernels.py --smoke      # CPU: tiny shapes through the Triton interpreter

On a GPU, for each KernelSpec's bench cases it times (median of triton.testing.do_bench) the
gpudl kernel, the eager PyTorch reference (cuDNN / cuBLAS / SDPA ...), every extra baseline the
spec names and `torch.compile` of the reference, forward and forward+backward; it reports
TFLOP/s or GB/s, the fraction of the device's peak, speedup over the best baseline and peak
memory of a forward call after a warm-up call (so not the autotuner's), and writes results.json,
results.md and speedup.png under --out.

Without a GPU it runs a smoke mode: every spec's first test case, forward and backward, through
the interpreter, checked against the reference. It claims no timings (the interpreter's speed
says nothing about a GPU's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from gpudl.kernels import REGISTRY  # noqa: E402

# Dense peak rates by device name: (bf16/fp16 tensor TFLOP/s, fp32 TFLOP/s, HBM GB/s), from the
# vendors' datasheets (NVIDIA H200, H100 SXM, A100 80GB SXM). A missing device reports no fraction.
PEAKS = {
    "H200": (989.0, 67.0, 4800.0),
    "H100": (989.0, 67.0, 3350.0),
    "A100": (312.0, 19.5, 2039.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flatten(item)] if isinstance(out, (tuple, list)) else []


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _forward_backward(fn, args):
    """A callable running fn forward and backward through every output that needs grad."""
    leaves = _leaves(args)

    def run():
        outs = [o for o in _flatten(fn(*args)) if o.requires_grad]
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    return run if leaves else None


def _peak(device_name: str):
    for key, peaks in PEAKS.items():
        if key in device_name:
            return peaks
    return None


def peak_memory_mib(fn, args, memory=None) -> float:
    """Peak memory of one forward call fn(*args) above what was allocated before it, in MiB,
    read on a call AFTER a warm-up call: the first call of an autotuned kernel benchmarks its
    configs (Triton's do_bench allocates a 256 MiB L2-flush buffer for it) and compiles, which
    would add 256 MiB to every autotuned op. `memory` is torch.cuda unless a test passes a stand-in
    (synchronize, memory_allocated, reset_peak_memory_stats, max_memory_allocated)."""
    memory = torch.cuda if memory is None else memory
    fn(*args)  # warm-up: autotuning, compilation, lazy allocations; its outputs are freed here
    memory.synchronize()
    base = memory.memory_allocated()
    memory.reset_peak_memory_stats()
    fn(*args)
    memory.synchronize()
    return (memory.max_memory_allocated() - base) / 2**20


def _measure(fn, args, quick: bool) -> dict:
    from triton.testing import do_bench

    warmup, rep = (10, 40) if quick else (25, 200)
    result = {}
    try:
        result["peak_mem_mb"] = peak_memory_mib(fn, args)
        result["fwd_ms"] = do_bench(lambda: fn(*args), warmup=warmup, rep=rep, return_mode="median")
        fwd_bwd = _forward_backward(fn, args)
        if fwd_bwd is not None:
            result["fwd_bwd_ms"] = do_bench(fwd_bwd, warmup=warmup, rep=rep, return_mode="median")
    except Exception as exc:  # a baseline that cannot run this case is reported, not fatal
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return result


def run_gpu(ops, dtype_name: str, quick: bool, out_dir: Path) -> list[dict]:
    dtype = DTYPES[dtype_name]
    device = torch.device("cuda")
    device_name = torch.cuda.get_device_name()
    peaks = _peak(device_name)
    rows = []
    for op in ops:
        spec = REGISTRY[op]
        cases = spec.bench_cases[:2] if quick else spec.bench_cases
        for case in cases:
            torch.manual_seed(0)
            args = case.make(dtype, device)
            impls = {"gpudl": spec.triton, "torch": spec.reference, **spec.baselines}
            if not quick:
                try:
                    impls["torch.compile"] = torch.compile(spec.reference)
                except Exception as exc:
                    print(f"{op}/{case.name}: torch.compile unavailable: {exc}", file=sys.stderr)
            timings = {name: _measure(fn, args, quick) for name, fn in impls.items()}
            flops = spec.flops(args) if spec.flops else None
            nbytes = spec.bytes_moved(args) if spec.bytes_moved else None
            for name, t in timings.items():
                row = {"op": op, "case": case.name, "dtype": dtype_name, "impl": name, "device": device_name, **t}
                if "fwd_ms" in t:
                    seconds = t["fwd_ms"] / 1e3
                    if flops:
                        row["fwd_tflops"] = flops / seconds / 1e12
                        if peaks:
                            peak_flops = peaks[0] if dtype != torch.float32 else peaks[1]
                            row["fwd_frac_peak_flops"] = row["fwd_tflops"] / peak_flops
                    if nbytes:
                        row["fwd_gbps"] = nbytes / seconds / 1e9
                        if peaks:
                            row["fwd_frac_peak_bw"] = row["fwd_gbps"] / peaks[2]
                rows.append(row)
            ours, our_row = timings["gpudl"], rows[-len(timings)]  # "gpudl" is the first impl
            for phase in ("fwd_ms", "fwd_bwd_ms"):
                baselines = [(v[phase], k) for k, v in timings.items() if k != "gpudl" and phase in v]
                if baselines and phase in ours:
                    best_ms, best_name = min(baselines)
                    our_row[f"{phase[:-3]}_speedup_vs_best"] = best_ms / ours[phase]
                    our_row[f"{phase[:-3]}_best_baseline"] = best_name
            print(
                f"{op:40s} {case.name:28s} "
                + "  ".join(
                    f"{k}={v.get('fwd_ms', float('nan')):.3f}/{v.get('fwd_bwd_ms', float('nan')):.3f}ms"
                    for k, v in timings.items()
                ),
                flush=True,
            )
            del args
            torch.cuda.empty_cache()
    _write_outputs(rows, out_dir, device_name)
    return rows


def _write_outputs(rows: list[dict], out_dir: Path, device_name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    def fmt(v, spec=".3f"):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        f"Benchmarks on {device_name}, {meta['date']}, torch {meta['torch']}, triton {meta.get('triton', '?')}. "
        "Median times (ms); speedup = best baseline time / gpudl time.",
        "",
        "| op | case | dtype | impl | fwd ms | fwd+bwd ms | TFLOP/s | GB/s | % peak | fwd speedup | fwd+bwd speedup "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = r.get("fwd_frac_peak_flops", r.get("fwd_frac_peak_bw"))
        cells = [
            r["op"], r["case"], r["dtype"], r["impl"], fmt(r.get("fwd_ms")), fmt(r.get("fwd_bwd_ms")),
            fmt(r.get("fwd_tflops"), ".1f"), fmt(r.get("fwd_gbps"), ".0f"), fmt(frac * 100 if frac else None, ".0f"),
            fmt(r.get("fwd_speedup_vs_best"), ".2f"), fmt(r.get("fwd_bwd_speedup_vs_best"), ".2f"),
            fmt(r.get("peak_mem_mb"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |" + (f" error: {r['error']}" if "error" in r else ""))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["impl"] == "gpudl" and "fwd_speedup_vs_best" in r]
    if ours:
        labels = [f"{r['op']}\n{r['case']}" for r in ours]
        fig, ax = plt.subplots(figsize=(max(6, len(ours) * 0.9), 4))
        x = range(len(ours))
        ax.bar([i - 0.2 for i in x], [r["fwd_speedup_vs_best"] for r in ours], width=0.4, label="forward")
        ax.bar(
            [i + 0.2 for i in x],
            [r.get("fwd_bwd_speedup_vs_best", 0) for r in ours],
            width=0.4,
            label="forward+backward",
        )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs best PyTorch baseline")
        ax.set_title(f"gpudl kernels on {device_name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "speedup.png", dpi=120)
        plt.close(fig)


def run_smoke(ops) -> list[dict]:
    """Each spec's first case, forward and backward, interpreted; correctness only, no timings."""
    rows = []
    for op in ops:
        spec = REGISTRY[op]
        torch.manual_seed(0)
        args = spec.cases[0].make(torch.float32, torch.device("cpu"))
        ref_args = tuple(
            a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
        )
        outs, refs = _flatten(spec.triton(*args)), _flatten(spec.reference(*ref_args))
        atol, rtol = spec.tolerances[torch.float32]
        ok = all(torch.allclose(o, r, atol=atol, rtol=rtol) for o, r in zip(outs, refs)) and len(outs) == len(refs)
        backward = _forward_backward(spec.triton, args) if spec.differentiable else None
        if backward is not None:
            backward()
        rows.append({"op": op, "case": spec.cases[0].name, "ok": bool(ok), "backward": backward is not None})
        print(f"smoke {op:40s} {spec.cases[0].name:28s} {'ok' if ok else 'MISMATCH'}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark gpudl kernels against PyTorch.")
    parser.add_argument(
        "--quick", action="store_true", help="first two bench cases per op, short timing loops (about 3 min on one GPU)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU smoke run through the interpreter (the default without a GPU)"
    )
    parser.add_argument("--ops", nargs="+", default=sorted(REGISTRY), help="which ops (default: all registered)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, default=Path("bench_results/local"))
    args = parser.parse_args(argv)
    unknown = [op for op in args.ops if op not in REGISTRY]
    if unknown:
        parser.error(f"unknown ops {unknown}; registered: {sorted(REGISTRY)}")
    if args.smoke or not torch.cuda.is_available():
        rows = run_smoke(args.ops)
        print("smoke mode: correctness only, no timings (no GPU)")
        return 0 if all(r["ok"] for r in rows) else 1
    run_gpu(args.ops, args.dtype, args.quick, args.out)
    print(f"wrote {args.out}/results.json, results.md, speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

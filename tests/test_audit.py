"""The compiled GPU code of every kernel variant, read without a GPU (gpudl.kernels.audit).

CI does not recompile everything: `python -m gpudl.kernels.audit --check bench_results/audit/current`
computes the key of every compilation (a hash of its kernel's source and dependencies, signature,
constexprs, warps/stages, arch, Triton version), recompiles and disassembles those whose key is not
in the committed record, plus a fixed sample that is always recompiled and compared with the
record, and reports the union of recorded and fresh figures. The rules below read that union;
one test fails with the refresh command when the record is stale. The full audit runs in
scripts/gpu_check.sh and with `--record ... --full`.

Under pytest-xdist the first worker to ask runs the check (tests/conftest.py schedules
test_every_kernel_compiles_for_sm80_and_sm90 first), the others read its file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "bench_results" / "audit" / "current"
REFRESH = "python -m gpudl.kernels.audit --record bench_results/audit/current"


def _compile_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_audit(*args, timeout=1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpudl.kernels.audit", *map(str, args)], capture_output=True,
                          text=True, env=_compile_env(), timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="session")
def audit(tmp_path_factory):
    # Each xdist worker has its own session: share the run's base folder (the workers' parent).
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "kernel_audit"
    with FileLock(str(root / "kernel_audit.lock")):
        if not (out / "audit.json").exists():
            proc = _run_audit("--check", RECORD, "--out", out, "--jobs", min(2, os.cpu_count() or 1))
            (root / "kernel_audit.log").write_text(proc.stdout + proc.stderr)
            if not (out / "audit.json").exists():
                pytest.fail(f"the audit wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "audit.json").read_text())
    report["log"] = (root / "kernel_audit.log").read_text()
    return report


def _compiled(report, **where):
    return [r for r in report["records"] if r.get("ok") and all(r.get(k) == v for k, v in where.items())]


def _name(r) -> str:
    unit = ",".join(r["unit_strides"]) or "no unit stride"
    return f"{r['op']} {r['variant']} {r['arch']} [{unit}; {','.join(r['layouts'])}]"


def _spills(r) -> bool:
    return bool(r["stack_bytes"] or r["local_bytes"] or r["ldl"] or r["stl"])


# Open audit failures, one line each ("<what> | <compilation>"): known bugs, listed so that CI
# holds every rule for everything else. A new failure fails the test, and so does a listed one
# that no longer fails (remove its line: the list only shrinks). See docs/audit.md.
KNOWN_FAILURES = Path(__file__).with_name("audit_known_failures.txt")


def _known_failures(what: str) -> set[str]:
    lines = [line.split(" | ", 1) for line in KNOWN_FAILURES.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    return {name for rule, name in lines if rule == what}


def _fail_listing(problems: list[str], what: str) -> None:
    known = _known_failures(what)
    new = sorted(p for p in problems if p.split(": ", 1)[0] not in known)
    fixed = sorted(known - {p.split(": ", 1)[0] for p in problems})
    assert not new, f"{len(new)} {what}:\n" + "\n".join(new)
    assert not fixed, (f"{len(fixed)} listed in {KNOWN_FAILURES.name} as '{what}' pass now; remove their lines:\n"
                       + "\n".join(fixed))


def test_every_kernel_compiles_for_sm80_and_sm90(audit):
    """Every CompileVariant of every spec builds for both GPUs within the shared-memory limit
    (recorded or compiled now); the run ends with its one-line summary."""
    from gpudl.kernels import REGISTRY

    records = audit["records"]
    assert {r["op"] for r in records} == set(REGISTRY), "some registered op was not compiled"
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}
    failures = [r for r in records if not r.get("ok")]
    assert not failures, "\n".join(f"{r['op']} {r.get('variant')} {r.get('arch')}: {r.get('error')}" for r in failures)
    assert f"{len(records)}/{len(records)} compiled, largest shared memory" in audit["log"], audit["log"][-2000:]
    for r in records:
        assert r["registers"] > 0 and r["warps_per_sm"] > 0, _name(r)
        if r["gemm_like"]:
            assert r["instructions"] > 0, _name(r)


def test_the_audit_record_is_current(audit):
    """Every compilation's key is in bench_results/audit/current with the same value (no kernel,
    variant or Triton changed without a refreshed record); else one line names the command."""
    stale = audit["stale"]
    if any(stale.values()):
        line = next(line for line in audit["log"].splitlines() if REFRESH in line)
        pytest.fail(line, pytrace=False)


def test_the_sample_is_recompiled_and_matches_the_record(audit):
    """The fixed sample (2-4 compilations) went through compile + disassemble in this run, and its
    figures equal the recorded ones."""
    assert 2 <= len(audit["sample"]) <= 4, audit["sample"]
    assert set(audit["sample"]) <= set(audit["recompiled"])
    assert not audit["sample_mismatches"], "\n".join(audit["sample_mismatches"])


def test_no_half_precision_variant_spills(audit):
    """No bf16/fp16 candidate spills registers to local memory, on sm_80 or sm_90, in any layout."""
    _fail_listing([f"{_name(r)}: {r['stack_bytes'] + r['local_bytes']} B, {r['ldl']} LDL / {r['stl']} STL"
                   for r in _compiled(audit, half=True) if _spills(r)], "half-precision compilations spill")


def test_float32_gpu_candidates_do_not_spill(audit):
    """Every float32 candidate (what the autotuner may pick on a GPU) keeps its values in registers."""
    _fail_listing([f"{_name(r)}: {r['stack_bytes'] + r['local_bytes']} B, {r['ldl']} LDL / {r['stl']} STL"
                   for r in _compiled(audit, dtype="fp32") if _spills(r)], "float32 compilations spill")


def test_half_precision_gemm_loops_use_tensor_cores_and_async_copies(audit):
    """GEMM-like bf16/fp16 variants: warpgroup MMA (HGMMA) on sm_90 for tiles of >= 64 rows on
    >= 4 warps, tensor cores (HMMA) otherwise and on sm_80; pipelined asynchronous loads (LDGSTS
    or TMA) whenever num_stages > 1, in the layouts the cases launch contiguously or channels_last
    (a transposed operand may fall back to plain loads)."""
    problems = []
    for r in _compiled(audit, half=True, gemm_like=True):
        rows = int(r["constexprs"].get("BLOCK_M", 0))
        if r["arch"] == "sm_90" and rows >= 64 and r["num_warps"] >= 4:
            if not r["hgmma"]:
                problems.append(f"{_name(r)}: no HGMMA (HMMA {r['hmma']})")
        elif not (r["hmma"] or r["hgmma"]):
            problems.append(f"{_name(r)}: no tensor-core instruction")
        native = {"contiguous", "channels_last"} & set(r["layouts"])
        if r["num_stages"] > 1 and native and not r["async_copies"]:
            problems.append(f"{_name(r)}: num_stages {r['num_stages']} but no asynchronous copy")
    _fail_listing(problems, "GEMM main loops without tensor cores or pipelined loads")


def test_gemm_baseline_ratios_are_reported(audit):
    """Every compiled GEMM-like variant with a tile is set beside the plain GEMM at that tile."""
    from gpudl.kernels.audit import gemm_tile

    for r in _compiled(audit, gemm_like=True):
        if gemm_tile(r) is not None:
            assert r.get("registers_vs_baseline", 0) > 0 and r.get("instructions_vs_baseline", 0) > 0, _name(r)


def test_every_gemm_family_tensor_core_variant_has_a_hot_loop_model(audit):
    """Each GEMM-family compilation with tensor-core instructions (HGMMA on sm_90, HMMA) reports
    its hot loop: instructions by class, multiply-adds per iteration, and a modeled bound in
    (0, 1] whenever the MMA's rate is known (bf16/fp16/tf32)."""
    from gpudl.kernels.audit import GEMM_FAMILY

    problems = []
    for r in _compiled(audit, gemm_like=True):
        if r["op"] not in GEMM_FAMILY or not (r["hmma"] or r["hgmma"]):
            continue
        loop = r.get("hot_loop")
        if not loop:
            problems.append(f"{_name(r)}: no loop holds its tensor-core instructions")
        elif loop["tensor"] < 1 or loop["macs"] <= 0 or loop["instructions"] < loop["tensor"]:
            problems.append(f"{_name(r)}: implausible hot loop {loop}")
        elif loop["mma_input"] in ("bf16", "fp16", "tf32") and not 0 < loop["bound"] <= 1:
            problems.append(f"{_name(r)}: bound {loop['bound']}")
    _fail_listing(problems, "GEMM-family compilations without a hot-loop model")


def test_half_precision_gemm_family_hot_loops_reach_the_textbook_bound(audit):
    """The hot-loop model (an upper bound from instruction issue, not a GPU measurement): every
    half-precision GEMM-family variant's bound is >= 0.8x the plain GEMM's at its tile and
    warps/stages, on sm_90 and sm_80; attention's forward (unmasked and causal) >= 0.8x the
    textbook flash-attention forward's."""
    problems = []
    for r in audit["records"]:
        verdict = r.get("hot_loop_rule") or ""
        if verdict.startswith("FAIL"):
            loop = r.get("hot_loop") or {}
            problems.append(f"{_name(r)}: bound {loop.get('bound')} ({loop.get('limit')}, {loop.get('instructions')} "
                            f"instructions, {loop.get('tensor')} tensor), vs {r.get('textbook') or r.get('baseline')}: "
                            f"{verdict}")
    _fail_listing(problems, "half-precision GEMM-family hot loops below 0.8x their textbook baseline")


def test_attention_backward_is_reported_beside_the_textbook_backward(audit):
    """Attention's dK/dV and dQ kernels (half precision) carry the textbook kernel's bound beside
    theirs (reported, no rule)."""
    from gpudl.kernels.audit import role

    rows = [r for r in _compiled(audit, op="scaled_dot_product_attention", half=True)
            if role(r) in ("attention_bwd_dkdv", "attention_bwd_dq")]
    assert rows
    for r in rows:
        assert r.get("textbook", "").startswith("baseline|textbook_bwd") and r["bound_vs_baseline"] > 0, _name(r)


def test_memory_bound_streams_use_128_bit_accesses(audit):
    """The memory-bound kernels (losses, layer_norm, sgd_step, max_pool2d) compiled for a
    contiguous, 16-byte aligned launch (channels_last for max_pool2d) load, and store, their
    streams 128 bits at a time (LDG.E.128 / STG.E.128)."""
    from gpudl.kernels.audit import STREAM_OPS

    checked = [r for r in audit["records"] if r.get("stream_rule")]
    assert {r["op"] for r in checked} == set(STREAM_OPS), "some memory-bound op has no contiguous stream compiled"
    _fail_listing([f"{_name(r)}: {r['stream_rule']} (loads {r['global_widths']['load']}, stores "
                   f"{r['global_widths']['store']})" for r in checked if r["stream_rule"].startswith("FAIL")],
                  "memory-bound compilations without 128-bit accesses")


# --------------------------------------------------------------------------- the record itself
def test_a_changed_kernel_fails_the_check_with_the_refresh_command(tmp_path):
    """A record whose key for one compilation differs from the code's (what editing the kernel
    without refreshing does) makes --check recompile that compilation and exit 1 with one line
    naming the refresh command."""
    record = json.loads((RECORD / "audit.json").read_text())
    victim = next(r for r in sorted(record["records"], key=lambda r: r["id"])
                  if r["op"] == "mse_loss" and r["arch"] == "sm_80")
    victim["key"] = "0" * 20
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "audit.json").write_text(json.dumps(record))
    proc = _run_audit("--check", tmp_path / "record", "--op", "mse_loss", "--arch", "80", "--variant",
                      victim["id"], "--out", tmp_path / "out", "--jobs", "1", timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert REFRESH in lines[-1] and victim["id"] in lines[-1] and "1 changed" in lines[-1], lines[-3:]
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["recompiled"] == [victim["id"]]


def test_compilation_keys_follow_the_source_its_callees_and_constexprs():
    """The key changes with the source of a @triton.jit function the kernel calls and with a
    constexpr, and not when the kernel only moves down its file (Triton's own cache key would)."""
    script = r"""
import dataclasses
from gpudl.kernels import _audit_baselines as base, _audit_record as rec
variant, unit = base.attention_variant("attention_fwd", "bf16", False, 64, 64, 64, 4, 3)
before = rec.compilation_key(variant, 90, unit)
callee = base._flash_fwd_step
callee._unsafe_update_src(callee.src.replace("m_new = tl.maximum", "m_new = 1.0 * tl.maximum"))
rec.forget()
changed_callee = rec.compilation_key(variant, 90, unit)
callee._unsafe_update_src(callee.src.replace("m_new = 1.0 * tl.maximum", "m_new = tl.maximum"))
rec.forget()
same_again = rec.compilation_key(variant, 90, unit)
other = dataclasses.replace(variant, constexprs={**variant.constexprs, "BLOCK_N": 32})
base._textbook_attn_fwd.starting_line_number += 40
rec.forget()
moved = rec.compilation_key(variant, 90, unit)
print(before != changed_callee, same_again == before, rec.compilation_key(other, 90, unit) != before,
      moved == before, rec.compilation_key(variant, 80, unit) != before, rec.compilation_key(variant, 90, ()) != before)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_compile_env(),
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True"] * 6, proc.stdout


def test_refreshing_writes_a_record_the_check_accepts(tmp_path):
    """--record on one variant writes a record (one compilation per line) that --check then finds
    current; a second refresh recompiles nothing."""
    from gpudl.kernels import REGISTRY

    target = f"mse_loss|{REGISTRY['mse_loss'].compile_variants()[0].name}|"
    first = _run_audit("--record", tmp_path, "--op", "mse_loss", "--arch", "90", "--variant", target, "--jobs", "1",
                       timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    text = (tmp_path / "audit.json").read_text()
    records = json.loads(text)["records"]
    assert records and all(r["op"] == "mse_loss" and r["arch"] == "sm_90" for r in records)
    own_line = [line for line in text.splitlines() if line.startswith('{"') and '"id": "mse_loss|' in line]
    assert len(own_line) == len(records)
    shutil.copy(tmp_path / "audit.json", tmp_path / "first.json")
    again = _run_audit("--record", tmp_path, "--op", "mse_loss", "--arch", "90", "--variant", target, "--jobs", "1",
                       timeout=600)
    assert again.returncode == 0 and ", 0 compiled now," in again.stdout, again.stdout + again.stderr

"""The compiled GPU code of every kernel variant, read without a GPU (gpudl.kernels.audit).

One audit per test session compiles every registered variant for sm_80 and sm_90, specialized as
the registry's launches are (gpudl.kernels.compile_check), and reads each cubin; the compile
check and the code-quality rules below share it. Under pytest-xdist the first worker to ask runs
it (tests/conftest.py schedules that test first and the rule tests last), the others read its file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from filelock import FileLock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def audit(tmp_path_factory):
    # Each xdist worker has its own session: share the run's base folder (the workers' parent).
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "kernel_audit"
    with FileLock(str(root / "kernel_audit.lock")):
        if not (out / "audit.json").exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, "-m", "gpudl.kernels.audit", "--sass", "gemm", "--out", str(out)],
                                  capture_output=True, text=True, env=env, timeout=1800)
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


def _fail_listing(problems: list[str], what: str) -> None:
    assert not problems, f"{len(problems)} {what}:\n" + "\n".join(sorted(problems))


def test_every_kernel_compiles_for_sm80_and_sm90(audit):
    """Every CompileVariant of every spec builds for both GPUs within the shared-memory limit;
    the run ends with its one-line summary."""
    from gpudl.kernels import REGISTRY

    records = audit["records"]
    assert {r["op"] for r in records} == set(REGISTRY), "some registered op was not compiled"
    failures = [r for r in records if not r.get("ok")]
    assert not failures, "\n".join(f"{r['op']} {r.get('variant')} {r.get('arch')}: {r.get('error')}" for r in failures)
    assert f"{len(records)}/{len(records)} compiled, largest shared memory" in audit["log"], audit["log"][-2000:]
    for r in records:
        assert r["registers"] > 0 and r["warps_per_sm"] > 0, _name(r)
        if r["gemm_like"]:  # the ones the CI audit (--sass gemm) disassembles
            assert r["instructions"] > 0, _name(r)


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
    for r in _compiled(audit, gemm_like=True):
        if "BLOCK_M" in r["constexprs"] and ("BLOCK_K" in r["constexprs"] or "BLOCK_D" in r["constexprs"]):
            assert r.get("registers_vs_baseline", 0) > 0 and r.get("instructions_vs_baseline", 0) > 0, _name(r)

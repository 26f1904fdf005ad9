"""The command lines: `python scripts/train.py` (default experiment), `-m` multirun, and
`python scripts/eval.py ckpt_path=...`, as subprocesses writing under a temporary GPUDL_ROOT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl.utils import repo_root  # noqa: E402

QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def script(name: str, *args: str, root: Path, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUDL_ROOT": str(root), **extra_env}
    env.pop("WANDB_MODE", None)  # train() must pick offline by itself (no login here)
    env["NETRC"] = str(root / "no-netrc")
    proc = subprocess.run([sys.executable, str(repo_root() / "scripts" / name), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def imported_modules(importtime_log: str) -> set[str]:
    """Modules listed by python -X importtime (PYTHONPROFILEIMPORTTIME=1) on stderr."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_default_train_prints_summary_and_eval_reproduces_it(tmp_path):
    proc = script("train.py", "logger=csv", *QUICK, root=tmp_path, cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    # A run imports what it uses: no W&B without a W&B logger, no sweep plugins without a sweep.
    imported = imported_modules(proc.stderr)
    assert "lightning" in imported and not imported & {"wandb", "optuna", "submitit", "hydra_plugins"}
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("[gpudl] cnn_digits: ") and "test/acc=" in last_line
    (run_dir,) = (tmp_path / "logs" / "cnn_digits" / "runs").iterdir()
    assert str(run_dir) in last_line
    for name in ("metrics.json", "config.yaml", ".hydra/config.yaml", "cnn_digits.log", "csv/metrics.csv"):
        assert (run_dir / name).exists(), name
    report = json.loads((run_dir / "metrics.json").read_text())

    # The same test batches as the run (limit_test_batches=1).
    proc = script("eval.py", f"ckpt_path={report['tested_checkpoint']}", "trainer.limit_test_batches=1",
                  "trainer.enable_progress_bar=false", root=tmp_path, cwd=tmp_path)
    assert proc.stdout.strip().splitlines()[-1].startswith("[gpudl] eval cnn_digits: ")
    (eval_dir,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    evaluated = json.loads((eval_dir / "eval_metrics.json").read_text())["metrics"]
    assert evaluated["test/acc"] == pytest.approx(report["metrics"]["test/acc"])
    assert evaluated["test/loss"] == pytest.approx(report["metrics"]["test/loss"], rel=1e-5)


def test_multirun_writes_one_run_folder_per_job(tmp_path):
    pytest.importorskip("wandb", reason="logs to W&B (the GPU check machine has no wandb)")
    script("train.py", "-m", "experiment=linreg_toy", "logger=many", "seed=1,2", *QUICK, root=tmp_path, cwd=tmp_path)
    (sweep,) = (tmp_path / "logs" / "linreg_toy" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    seeds = []
    for job in jobs:
        report = json.loads((job / "metrics.json").read_text())
        seeds.append(report["seed"])
        assert Path(report["best_checkpoint"]).parent == job / "checkpoints"
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # one W&B run per job, offline
        assert (job / "csv" / "metrics.csv").is_file()
    assert seeds == [1, 2]

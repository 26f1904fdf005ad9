"""Sweeps: the pinned plugin extra, a grid multirun that survives a NaN job and a bad value (each
job its own W&B run, grouped by sweep), an Optuna search (seeded TPE) through hparams_search,
the joblib launcher, and scripts/summarize.py's table, failure list and plot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl.utils import compose, repo_root  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def script(name: str, *args: str, root: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUDL_ROOT": str(root), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(repo_root() / "scripts" / name), *args], capture_output=True,
                          text=True, env=env, cwd=root, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def sweep_dir(root: Path, task: str) -> Path:
    (found,) = (root / "logs" / task / "multiruns").iterdir()
    return found


def test_sweeps_extra_pins_the_installed_plugins():
    import tomllib

    extras = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = dict(re.fullmatch(r"([\w-]+)==([\w.]+)", p).groups() for p in extras["sweeps"])
    assert {"hydra-optuna-sweeper", "optuna", "hydra-joblib-launcher", "hydra-submitit-launcher"} <= set(pins)
    for name, pinned in pins.items():
        assert version(name) == pinned, name
    assert "gpudl[sweeps]" in extras["dev"]


def test_grid_sweep_goes_on_past_failed_jobs_and_summarizes(tmp_path):
    pytest.importorskip("wandb", reason="logs to W&B (the GPU check machine has no wandb)")
    # Plain gradient descent on diabetes: lr 0.1 trains, 1e6 diverges to inf at epoch 3
    # (FiniteLossGuard), -1 is a bad value (ConfigError before training). Two jobs at a time in
    # joblib's worker processes (the basic launcher's multirun is in test_train_scripts.py).
    proc = script("train.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "experiment=linreg_diabetes", "optimizer=gd", "logger=wandb",
                  "model.optimizer.lr=0.1,1e6,-1", "trainer.max_epochs=4", *QUIET, root=tmp_path)
    sweep = sweep_dir(tmp_path, "linreg_diabetes")
    reports = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    assert [r["status"] for r in reports] == ["ok", "failed", "failed"]
    assert reports[1]["error_type"] == "NonFiniteLossError" and reports[2]["error_type"] == "ConfigError"
    assert "model.optimizer.lr=-1" in reports[2]["overrides"]
    assert len(list(sweep.glob("*/.hydra"))) == 3  # one folder per job

    # One W&B run per job that got to training, grouped by sweep, job type = the job's overrides.
    group = f"linreg_diabetes-{sweep.name}".encode()
    for i, lr in [(0, "0.1"), (1, "1000000.0")]:  # Hydra writes 1e6 as 1000000.0
        (run,) = (sweep / str(i) / "wandb").glob("offline-run-*")
        (record,) = run.glob("run-*.wandb")
        data = record.read_bytes()
        assert group in data and f"model.optimizer.lr={lr}".encode() in data
        assert run.name.endswith((sweep / str(i) / "wandb_id.txt").read_text().strip())
    assert not (sweep / "2" / "wandb").exists()

    proc = script("summarize.py", str(sweep), root=tmp_path)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"Sweep {sweep}: 3 jobs, 1 succeeded, 2 failed; swept: model.optimizer.lr")
    assert "val/r2 (max)" in lines[1]
    assert re.match(r"\| 1 +\| 0 +\| 0\.1 ", lines[3])
    failures = proc.stdout.split("Failed jobs:")[1]
    assert "job 1 (model.optimizer.lr=1000000.0): NonFiniteLossError: FiniteLossGuard: training stopped" in failures
    assert "job 2 (model.optimizer.lr=-1): ConfigError: model.optimizer.lr must be a positive number" in failures
    png = sweep / "summary.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_still_fails(tmp_path):
    proc = script("train.py", "experiment=linreg_diabetes", "optimizer=gd", "model.optimizer.lr=1e6", "logger=none",
                  "trainer.max_epochs=4", *QUIET, root=tmp_path, check=False)
    assert proc.returncode == 1 and "FiniteLossGuard: training stopped" in proc.stderr
    # fail_fast=true in a multirun stops the sweep at the first failed job.
    proc = script("train.py", "-m", "experiment=linreg_diabetes", "model.optimizer.lr=-1,0.1", "fail_fast=true",
                  "logger=none", *QUIET, root=tmp_path, check=False)
    assert proc.returncode == 2 and "config error: model.optimizer.lr must be a positive number" in proc.stderr
    assert not (sweep_dir(tmp_path, "linreg_diabetes") / "1").exists()


def test_optuna_search_is_seeded_and_records_failed_trials(tmp_path):
    # batch_size 0 is a bad value: that trial fails (Optuna records it as FAIL) and the search goes on.
    space = "{model.optimizer.lr:'tag(log, interval(1e-4, 1e-1))',data.batch_size:'choice(32,0)'}"
    args = ["experiment=logreg_cancer", "hparams_search=logreg_cancer_optuna", "hydra.sweeper.n_trials=4",
            "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweeper.params={space}",
            "logger=none", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
            *QUIET]
    script("train.py", *args, root=tmp_path)
    sweep = sweep_dir(tmp_path, "logreg_cancer")
    results = (sweep / "optimization_results.yaml").read_text()
    assert "name: optuna" in results and "best_params:" in results and "model.optimizer.lr:" in results
    reports = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}
    assert len(reports) == 4
    lrs = sorted(o for r in reports.values() for o in r["overrides"] if o.startswith("model.optimizer.lr="))
    assert len(set(lrs)) == 4  # sampled, not a grid
    failed = [r for r in reports.values() if r["status"] == "failed"]
    assert failed  # the seeded search draws batch_size 0 at least once
    assert all("data.batch_size=0" in r["overrides"] and r["error_type"] == "ConfigError" for r in failed)
    summary = script("summarize.py", str(sweep), root=tmp_path).stdout
    assert "val/acc_best (max)" in summary and f"{4 - len(failed)} succeeded, {len(failed)} failed" in summary

    # Same seed, same trials.
    (tmp_path / "again").mkdir()
    script("train.py", *args, root=tmp_path / "again")
    again = sweep_dir(tmp_path / "again", "logreg_cancer")
    assert sorted(o for p in again.glob("*/metrics.json") for o in json.loads(p.read_text())["overrides"]
                  if o.startswith("model.optimizer.lr=")) == lrs


def test_optuna_configs_compose(tmp_path):
    for name, experiment in [("cnn_digits_optuna", "cnn_digits"), ("logreg_cancer_optuna", "logreg_cancer")]:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from gpudl.utils import config_dir

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose("train", overrides=[f"experiment={experiment}", f"hparams_search={name}"],
                                return_hydra_config=True)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
        assert sweeper.sampler._target_.endswith("TPESampler") and sweeper.sampler.seed == 1234
        assert "model.optimizer.lr" in sweeper.params and cfg.optimized_metric == "val/acc_best"
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    GlobalHydra.instance().clear()
    assert compose(["experiment=cnn_digits"], output_dir=tmp_path).fail_fast is None

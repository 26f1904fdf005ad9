"""The installed package: a regular (not editable) `pip install .` carries the Hydra configs as
package data, and its console script `gpudl-train` runs an experiment from any folder, writing
under that folder's logs/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl.utils import repo_root  # noqa: E402


@pytest.mark.slow
def test_installed_package_trains_from_any_folder(tmp_path):
    # Build from a copy: an in-tree build would leave build/ in the checkout. One experiment
    # exists only in the copy, so finding it proves the configs come from the installed package.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo_root() / name, source / name)
    for name in ("src", "kernels", "conf"):
        shutil.copytree(repo_root() / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    experiment = (source / "conf" / "experiment" / "logreg_cancer.yaml").read_text()
    (source / "conf" / "experiment" / "installed_copy.yaml").write_text(
        experiment.replace("task_name: logreg_cancer", "task_name: installed_copy"))

    # No dependencies (this environment has them) and no build isolation (setuptools, which torch
    # requires, is here): a few seconds, no network.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    assert (site / "gpudl" / "conf" / "experiment" / "installed_copy.yaml").is_file()

    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GPUDL_ROOT", "GPUDL_CONFIG_DIR")}
    env.update(PYTHONPATH=str(site), WANDB_MODE="offline", OMP_NUM_THREADS="1")

    proc = subprocess.run([str(site / "bin" / "gpudl-train"), "experiment=installed_copy", "logger=csv",
                           "trainer.max_epochs=1", "trainer.enable_progress_bar=false"],
                          cwd=anywhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (anywhere / "logs" / "installed_copy" / "runs").iterdir()
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["status"] == "ok" and "test/acc" in report["metrics"]

    # gpudl-eval is the same kind of wrapper around gpudl.cli.eval_main, which scripts/eval.py runs in
    # tests/test_train_scripts.py.
    assert (site / "bin" / "gpudl-eval").is_file()

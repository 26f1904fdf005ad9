"""A mistake on the command line ends in ONE line naming it and the closest names, exit status 2,
through the real entry points (scripts/train.py, scripts/eval.py) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl.utils import repo_root  # noqa: E402


def run_script(script: str, *args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUDL_ROOT": str(tmp_path), "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(repo_root() / "scripts" / script), *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("experiment=logreg_cancr", "gpudl: config error: no experiment named 'logreg_cancr'; closest: logreg_cancer"),
    ("optimizer=adamw", "gpudl: config error: no optimizer named 'adamw'; closest: adam"),
    ("trainer.max_epoch=3",
     "gpudl: config error: no key 'trainer.max_epoch' in the config; closest: trainer.max_epochs, trainer.min_epochs"),
    ("experimnt=logreg_cancer", "gpudl: config error: no key 'experimnt' in the config; closest: experiment"),
    ("model.optimizer.lrr=0.1", "gpudl: config error: no key 'model.optimizer.lrr' in the config; "
                                "closest: model.optimizer.lr"),
    ("seed=1,2", "gpudl: config error: Ambiguous value for argument 'seed=1,2'; "),
])
def test_typo_is_one_line_with_the_closest_names(override, expected, tmp_path):
    proc = run_script("train.py", override, "logger=none", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-2000:]
    assert "+" not in lines[0]  # Hydra's `+key=...` hint adds a key that nothing accepts
    assert not (tmp_path / "logs").exists()  # stopped before Hydra made a run folder


def test_an_unknown_group_option_far_from_every_name_lists_them_all(tmp_path):
    proc = run_script("train.py", "trainer=xyz", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("gpudl: config error: no trainer named 'xyz'; "
                                   "expected one of: cpu, ddp, ddp_cpu, default, fsdp, gpu")


def test_eval_typo_is_one_line(tmp_path):
    proc = run_script("eval.py", "run_dri=logs/x", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpudl: config error: no key 'run_dri' in the config; closest: run_dir"

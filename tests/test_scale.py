"""Scale-out: the trainer and precision presets compose and build, the SLURM launcher config
(submitit) composes with one task per device on each of trainer.num_nodes nodes, submitit's local
executor runs a job, and the digits CNN trained by two DDP processes (trainer=ddp_cpu) lands in
the accuracy band of one process, with one metrics.json and one W&B run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import add_callback

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from gpudl.train import train  # noqa: E402
from gpudl.utils import compose, config_dir, repo_root  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose("train", overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("preset, accelerator, devices, strategy", [
    ("cpu", "cpu", 1, None), ("gpu", "gpu", 1, None), ("ddp", "gpu", -1, "ddp"), ("fsdp", "gpu", -1, "fsdp"),
    ("ddp_cpu", "cpu", 2, "ddp_spawn"),
])
def test_trainer_presets(preset, accelerator, devices, strategy, tmp_path):
    cfg = compose([f"trainer={preset}", "trainer.num_nodes=1"], output_dir=tmp_path)
    t = cfg.trainer
    assert (t.accelerator, t.devices, t.get("strategy"), t.num_nodes) == (accelerator, devices, strategy, 1)
    assert compose([f"trainer={preset}", "trainer.num_nodes=4"], output_dir=tmp_path).trainer.num_nodes == 4
    if preset == "cpu":  # buildable here (ddp_cpu is trained below)
        trainer = instantiate(t, logger=False)
        assert trainer.num_devices == devices and trainer.num_nodes == 1


@pytest.mark.parametrize("preset", ["32-true", "16-mixed", "bf16-mixed"])
def test_precision_presets(preset, tmp_path):
    cfg = compose([f"precision={preset}", "trainer=gpu"], output_dir=tmp_path)
    assert cfg.trainer.precision == preset and "precision" not in cfg  # lands in trainer.precision
    assert compose([], output_dir=tmp_path).trainer.precision == "32-true"


def test_bf16_mixed_trains_on_cpu(tmp_path, monkeypatch):
    """precision=bf16-mixed reaches the model (its forward runs under bf16 autocast) and the
    logistic regression still learns: after one epoch it is well above the 63% of always guessing
    the majority class (0.895 measured)."""
    from lightning.pytorch.callbacks import Callback

    autocast = []

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            forward = pl_module.forward

            def recorded(*args, **kwargs):
                on = torch.is_autocast_enabled("cpu")
                autocast.append(torch.get_autocast_dtype("cpu") if on else None)
                return forward(*args, **kwargs)

            pl_module.forward = recorded

    add_callback(monkeypatch, Spy())
    metrics = train(compose(["experiment=logreg_cancer", "precision=bf16-mixed", "trainer=cpu", "logger=none",
                             "trainer.max_epochs=1", *QUIET], output_dir=tmp_path))
    assert autocast and set(autocast) == {torch.bfloat16}, autocast
    assert metrics["test/acc"] >= 0.85


def test_slurm_launcher_runs_one_task_per_device_on_every_node():
    cfg = compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                              "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.signal_delay_s > 0
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    assert isinstance(instantiate(launcher), SlurmLauncher)


@pytest.mark.slow
def test_submitit_local_runs_a_job(tmp_path):
    env = {**os.environ, "GPUDL_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, str(repo_root() / "scripts" / "train.py"), "-m", "hydra/launcher=submitit_local",
               "hydra.launcher.timeout_min=5", "experiment=linreg_toy", "logger=none", "trainer.max_epochs=1", *QUIET]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "linreg_toy" / "multiruns").iterdir()
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, monkeypatch):
    """The digits CNN, 3 epochs. Two processes with batch 16 each average the same 32 samples per
    step as one process with batch 32: the same number of steps, the same accuracy band."""
    pytest.importorskip("wandb", reason="logs to W&B (the GPU check machine has no wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    common = ["experiment=cnn_digits", "trainer.max_epochs=3", *QUIET]
    one = train(compose([*common, "logger=none", "trainer=cpu"], output_dir=tmp_path / "one"))
    out = tmp_path / "two"
    two = train(compose([*common, "logger=many", "trainer=ddp_cpu", "data.batch_size=16"], output_dir=out))
    assert one["test/acc"] > 0.85 and two["test/acc"] > 0.85
    assert abs(one["test/acc"] - two["test/acc"]) < 0.05 and abs(one["val/acc_best"] - two["val/acc_best"]) < 0.05
    report = json.loads((out / "metrics.json").read_text())
    assert report["status"] == "ok" and report["metrics"]["test/acc"] == two["test/acc"]
    assert Path(report["best_checkpoint"]).is_file()
    assert (out / "csv" / "metrics.csv").is_file() and (out / "csv" / "test" / "metrics.csv").is_file()  # fit, test
    run_id = (out / "wandb_id.txt").read_text().strip()
    runs = list((out / "wandb").glob("offline-run-*"))  # fit (rank 0) and test (this process): one run id
    assert runs and all(re.fullmatch(rf"offline-run-\d+_\d+-{run_id}(-\d+)?", r.name) for r in runs), runs

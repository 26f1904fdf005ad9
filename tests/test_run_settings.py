"""What a run sets up before training and reports: the CPU thread policy (cpu_threads) and the W&B
group and job type as the logged config shows them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl import tracking  # noqa: E402
from gpudl.train import ConfigError, train  # noqa: E402
from gpudl.utils import compose  # noqa: E402

FAST = ["experiment=linreg_toy", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


@pytest.fixture
def restore_threads(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # set_cpu_threads sets it; monkeypatch restores it
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("value,expected", [(1, 1), (2, 2), (None, "unchanged")])
def test_cpu_threads_is_set_at_start_and_logged(value, expected, tmp_path, restore_threads, caplog):
    before = torch.get_num_threads()
    with caplog.at_level("INFO", logger="gpudl.config"):
        train(compose([*FAST, "logger=none", f"cpu_threads={'null' if value is None else value}"],
                      output_dir=tmp_path))
    threads = before if expected == "unchanged" else expected
    assert torch.get_num_threads() == threads
    assert f"CPU threads: {threads} (cpu_threads={value}" in caplog.text


@pytest.mark.parametrize("value", [0, -2, 1.5, "all"])
def test_bad_cpu_threads_is_a_config_error(value, tmp_path, restore_threads):
    with pytest.raises(ConfigError, match=f"cpu_threads must be a positive integer or null .*got {value!r}"):
        train(compose([*FAST, "logger=none", f"cpu_threads={value}"], output_dir=tmp_path))


def test_wandb_logged_config_shows_the_sweep_group(tmp_path, monkeypatch, restore_threads):
    """In a multirun the W&B run's group is <experiment>-<sweep folder>: the logged config says the same."""
    pytest.importorskip("wandb", reason="logs to W&B (the GPU check machine has no wandb)")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(tracking, "hydra_job", lambda: {"multirun": True, "overrides": ["seed=3"]})
    logged = []
    monkeypatch.setattr(WandbLogger, "log_hyperparams", lambda self, params: logged.append(params))
    out = tmp_path / "sweep_2026-12-07" / "0"
    train(compose([*FAST, "logger=wandb", "seed=3"], output_dir=out))
    (params,) = [p for p in logged if "logger" in p]  # Lightning also logs the model's hyperparameters
    assert params["logger"]["wandb"]["group"] == "linreg_toy-sweep_2026-12-07"
    assert params["logger"]["wandb"]["job_type"] == "seed=3"

"""Bad input stops a run BEFORE training, with one message naming the key and what was expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from hydra.errors import ConfigCompositionException, MissingConfigException  # noqa: E402

from gpudl.train import ConfigError, train  # noqa: E402
from gpudl.utils import compose, repo_root  # noqa: E402

FAST = ["logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false"]


def check_stops_before_training(tmp_path: Path, overrides: list[str], *patterns: str) -> str:
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        train(compose([*FAST, *overrides], output_dir=out))
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    assert not (out / "checkpoints").exists()
    if (out / "metrics.json").exists():  # only the failure record (for sweeps), no metrics
        report = json.loads((out / "metrics.json").read_text())
        assert report["status"] == "failed" and report["metrics"] == {} and report["error"] == message
    return message


# --------------------------------------------------------------------------- Hydra level
@pytest.mark.parametrize("group", ["experiment", "model", "data", "optimizer", "logger"])
def test_unknown_group_option_lists_the_available_ones(group, tmp_path):
    with pytest.raises(MissingConfigException) as info:
        compose([f"{group}=nope"], output_dir=tmp_path)
    message = str(info.value)
    assert f"Could not find '{group}/nope'" in message
    assert f"Available options in '{group}'" in message
    if group == "experiment":
        assert "cnn_digits" in message and "gan_mnist" in message


def test_misspelled_override_key_is_named(tmp_path):
    with pytest.raises(ConfigCompositionException) as info:
        compose(["trainer.max_epoch=3"], output_dir=tmp_path)
    message = str(info.value) + str(info.value.__cause__)
    assert "trainer.max_epoch" in message and "+trainer.max_epoch=3" in message


# --------------------------------------------------------------------------- train() level
def test_missing_required_value(tmp_path):
    check_stops_before_training(tmp_path, ["experiment=linreg_toy", "optimized_metric=???"],
                                "missing required value(s): optimized_metric")
    check_stops_before_training(tmp_path, ["experiment=linreg_toy", "model.num_features=???"],
                                "model.num_features")


@pytest.mark.parametrize("override", ["model.optimizer.lr=-0.1", "model.optimizer.lr=0", "optimizer_lr.adam=-1",
                                      "model.optimizer.lr=abc"])
def test_non_positive_learning_rate(override, tmp_path):
    check_stops_before_training(tmp_path, ["experiment=linreg_toy", override],
                                "model.optimizer.lr must be a positive number")


@pytest.mark.parametrize("value", ["-5", "0", "2.5"])
def test_bad_batch_size(value, tmp_path):
    check_stops_before_training(tmp_path, ["experiment=logreg_cancer", f"data.batch_size={value}"],
                                "data.batch_size must be a positive int, or null for full batch", value)


def test_missing_data_file(tmp_path):
    message = check_stops_before_training(tmp_path, ["experiment=linreg_diabetes", "data.path=/nope.npz"],
                                          "data.path='/nope.npz'", "does not exist", "expected a .npz file")
    assert message.count("\n") == 0  # one line


def test_malformed_data_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    check_stops_before_training(tmp_path, ["experiment=logreg_cancer", f"data.path={bad}"],
                                f"data.path='{bad}'", "could not read data file", "expected a .npz file")
    wrong_arrays = tmp_path / "wrong.npz"
    np.savez(wrong_arrays, features=np.zeros((4, 3)))
    check_stops_before_training(tmp_path, ["experiment=logreg_cancer", f"data.path={wrong_arrays}"],
                                "arrays ['X', 'y'] are missing")


def test_data_file_that_does_not_fit_the_model(tmp_path):
    other = tmp_path / "three_features.npz"
    rng = np.random.default_rng(0)
    np.savez(other, X=rng.normal(size=(60, 3)), y=rng.normal(size=60))
    check_stops_before_training(tmp_path, ["experiment=linreg_diabetes", f"data.path={other}"],
                                "model.num_features=10 does not fit the data", "set model.num_features=3")


def test_unknown_target(tmp_path):
    check_stops_before_training(tmp_path, ["experiment=linreg_toy", "model._target_=gpudl.models.Nope"],
                                "model._target_: unknown target 'gpudl.models.Nope'")
    check_stops_before_training(tmp_path, ["experiment=linreg_toy", "model.optimizer._target_=torch.optim.Adamm"],
                                "model.optimizer._target_: unknown target 'torch.optim.Adamm'",
                                "did you mean 'torch.optim.Adam'")


def test_invalid_constructor_argument_names_the_key(tmp_path):
    check_stops_before_training(tmp_path, ["experiment=linreg_toy", "data.val_fraction=1.5"],
                                "data.val_fraction", "val_fraction must be a number in (0.0, 1.0)")


# --------------------------------------------------------------------------- the command line
def run_script(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUDL_ROOT": str(tmp_path), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(repo_root() / "scripts" / "train.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_command_line_errors_are_one_clean_message(tmp_path):
    proc = run_script("experiment=linreg_toy", "model.optimizer.lr=-1", "logger=none", tmp_path=tmp_path)
    assert proc.returncode == 2
    expected = "gpudl: config error: model.optimizer.lr must be a positive number (the learning rate), got -1"
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("logs/*/runs/*/checkpoints"))


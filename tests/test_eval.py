"""gpudl.train.evaluate (scripts/eval.py) reproduces the test metrics of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl.train import ConfigError, evaluate, train  # noqa: E402
from gpudl.utils import compose  # noqa: E402

FAST = ["logger=none", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def train_then_evaluate(tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    run_dir = tmp_path / "run"
    train(compose([*FAST, *overrides], output_dir=run_dir))
    report = json.loads((run_dir / "metrics.json").read_text())
    ckpt = report["tested_checkpoint"]
    assert ckpt and Path(ckpt).parent == run_dir / "checkpoints"
    evaluated = evaluate(compose([f"ckpt_path={ckpt}", *QUIET], config_name="eval", output_dir=tmp_path / "eval"))
    saved = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(evaluated) and saved["run_config"] == str(run_dir / "config.yaml")
    return report["metrics"], evaluated


@pytest.mark.parametrize(
    "experiment,keys",
    [("linreg_diabetes", ["test/mse", "test/r2", "test/loss"]), ("cnn_digits", ["test/acc", "test/loss"])],
)
def test_eval_reproduces_the_test_metrics(experiment, keys, tmp_path):
    trained, evaluated = train_then_evaluate(tmp_path, f"experiment={experiment}")
    for key in keys:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), key


def test_eval_reproduces_gan_quality_with_a_retrained_judge(tmp_path):
    trained, evaluated = train_then_evaluate(
        tmp_path, "experiment=gan_digits", "model.judge_epochs=1", "model.num_eval_samples=50", "callbacks.sample_grid.num_samples=4"
    )
    for key in ["test/gen_confidence", "test/gen_classes", "test/gen_score"]:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-5), key


def test_eval_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required value\(s\): ckpt_path"):
        evaluate(compose(QUIET, config_name="eval", output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"ckpt_path: checkpoint file '/nope.ckpt' does not exist"):
        evaluate(compose(["ckpt_path=/nope.ckpt"], config_name="eval", output_dir=tmp_path))
    stray = tmp_path / "stray" / "model.ckpt"
    stray.parent.mkdir()
    stray.write_bytes(b"")
    with pytest.raises(ConfigError, match="found no config.yaml of the run"):
        evaluate(compose([f"ckpt_path={stray}"], config_name="eval", output_dir=tmp_path / "eval"))

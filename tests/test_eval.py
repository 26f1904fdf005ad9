"""gpudl.train.evaluate (scripts/eval.py) reproduces the test metrics of a run: run_dir=<run dir> tests
the checkpoint the run tested; ckpt_path=<file> any checkpoint (last.ckpt: the final epoch's weights)."""

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


def train_then_evaluate(tmp_path: Path, *overrides: str, by: str = "ckpt_path") -> tuple[dict, dict]:
    run_dir = tmp_path / "run"
    train(compose([*FAST, *overrides], output_dir=run_dir))
    report = json.loads((run_dir / "metrics.json").read_text())
    ckpt = report["tested_checkpoint"]
    assert ckpt and Path(ckpt).parent == run_dir / "checkpoints"
    which = f"ckpt_path={ckpt}" if by == "ckpt_path" else f"run_dir={run_dir}"
    evaluated = evaluate(compose([which, *QUIET], config_name="eval", output_dir=tmp_path / "eval"))
    saved = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(evaluated) and saved["run_config"] == str(run_dir / "config.yaml")
    assert saved["status"] == "ok" and saved["ckpt_path"] == ckpt
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
        tmp_path, "experiment=gan_digits", "model.judge_epochs=1", "model.num_eval_samples=50",
        "callbacks.sample_grid.num_samples=4",
    )
    for key in ["test/gen_confidence", "test/gen_classes", "test/gen_score", "test/fid", "baseline/fid_floor"]:
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-5), key


def test_run_dir_tests_the_checkpoint_the_run_tested_and_last_ckpt_the_final_epoch(tmp_path):
    # Monitoring the step with mode=min makes the first epoch's checkpoint the best: the run tests
    # it, while last.ckpt holds the final (second) epoch's weights.
    run_dir = tmp_path / "run"
    best_is_first = "callbacks.model_checkpoint.mode=min"
    trained = train(compose([*FAST, "experiment=linreg_toy", best_is_first], output_dir=run_dir))
    assert Path(json.loads((run_dir / "metrics.json").read_text())["tested_checkpoint"]).name == "epoch_000.ckpt"
    moved = tmp_path / "moved"  # a run folder moved since: its checkpoints are found by name
    run_dir.rename(moved)
    by_run = evaluate(compose([f"run_dir={moved}", *QUIET], config_name="eval", output_dir=tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "eval_metrics.json").read_text())["ckpt_path"] == str(
        moved / "checkpoints" / "epoch_000.ckpt")
    by_last = evaluate(compose([f"ckpt_path={moved}/checkpoints/last.ckpt", *QUIET], config_name="eval",
                               output_dir=tmp_path / "b"))
    assert by_run["test/mse"] == pytest.approx(trained["test/mse"], rel=1e-5)
    assert by_last["test/mse"] != pytest.approx(trained["test/mse"], rel=1e-3)


def test_eval_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate needs one of ckpt_path=<file.ckpt> or run_dir=<run dir>.*neither"):
        evaluate(compose(QUIET, config_name="eval", output_dir=tmp_path))
    failed = json.loads((tmp_path / "eval_metrics.json").read_text())  # recorded like a failed train()
    assert failed["status"] == "failed" and failed["error_type"] == "ConfigError"
    with pytest.raises(ConfigError, match="got both"):
        evaluate(compose(["ckpt_path=/a.ckpt", "run_dir=/b"], config_name="eval", output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"run_dir: /nope holds no metrics.json"):
        evaluate(compose(["run_dir=/nope"], config_name="eval", output_dir=tmp_path))
    no_checkpoint = tmp_path / "fdr"
    no_checkpoint.mkdir()
    (no_checkpoint / "metrics.json").write_text(json.dumps({"status": "ok", "tested_checkpoint": None}))
    with pytest.raises(ConfigError, match=r"names no tested checkpoint .*pass ckpt_path=<file.ckpt>"):
        evaluate(compose([f"run_dir={no_checkpoint}"], config_name="eval", output_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"ckpt_path: checkpoint file '/nope.ckpt' does not exist"):
        evaluate(compose(["ckpt_path=/nope.ckpt"], config_name="eval", output_dir=tmp_path))
    stray = tmp_path / "stray" / "model.ckpt"
    stray.parent.mkdir()
    stray.write_bytes(b"")
    with pytest.raises(ConfigError, match="found no config.yaml of the run"):
        evaluate(compose([f"ckpt_path={stray}"], config_name="eval", output_dir=tmp_path / "eval"))

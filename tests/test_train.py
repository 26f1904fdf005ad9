"""gpudl.train.train() end to end on composed configs: one short run per algorithm, the run folder's
contents, seeding, W&B offline mode, resuming, backend selection, and (slow) a converged run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import add_callback

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl import backend  # noqa: E402
from gpudl.train import ConfigError, train  # noqa: E402
from gpudl.utils import compose  # noqa: E402

# A few batches of everything, quietly; the experiment's own callbacks (checkpoints) stay on.
FAST = [
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# The GAN's judge and sample metrics, made cheap.
GAN_FAST = ["model.judge_epochs=1", "model.num_eval_samples=50", "callbacks.sample_grid.num_samples=16"]


def run(tmp_path: Path, *overrides: str, fast: bool = True) -> tuple[dict, Path]:
    out = tmp_path / "run"
    cfg = compose([*(FAST if fast else []), *overrides], output_dir=out)
    return train(cfg), out


def read_report(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# Every GAN's Fréchet distances: the samples' (val, test), the untrained generator's, real vs real.
GAN_FID = ["val/fid", "test/fid", "baseline/fid", "baseline/fid_floor"]
# The metrics each experiment must log (beyond train/loss, val/loss, test/loss).
EXPECTED_KEYS = {
    "linreg_diabetes": ["test/mse", "test/r2", "val/r2"],
    "linreg_toy": ["test/mse", "test/r2", "test/slope", "test/intercept", "val/r2"],
    "logreg_cancer": ["test/acc", "val/acc", "val/acc_best"],
    "cnn_digits": ["test/acc", "val/acc_best"],
    "cnn_mnist": ["test/acc", "val/acc_best"],
    "rnn_digits": ["test/acc", "val/acc_best"],
    "attention_digits": ["test/acc", "val/acc_best"],
    "gan_digits": ["val/gen_score", "val/gen_score_best", "test/gen_confidence", "test/gen_classes",
                   "baseline/gen_confidence", *GAN_FID],
    "gan_mnist": ["val/gen_score", "val/gen_score_best", "test/gen_confidence", "test/gen_classes",
                  "baseline/gen_confidence", *GAN_FID],
    "dcgan_mnist": ["val/gen_score", "val/gen_score_best", "test/gen_confidence", "test/gen_classes",
                    "baseline/gen_confidence", *GAN_FID],
}


@pytest.mark.parametrize("experiment", sorted(EXPECTED_KEYS))
def test_every_experiment_trains_a_few_steps(experiment, tmp_path, capsys):
    metrics, out = run(tmp_path, f"experiment={experiment}", *(GAN_FAST if "gan" in experiment else []))
    for key in ["train/loss", "val/loss", "test/loss", *EXPECTED_KEYS[experiment]]:
        assert key in metrics and isinstance(metrics[key], float), key
    report = read_report(out)
    assert report["metrics"] == pytest.approx(metrics)
    assert report["optimized_metric"] == compose([f"experiment={experiment}"], output_dir=out).optimized_metric
    assert report["optimized_metric_value"] == metrics[report["optimized_metric"]]
    # best and last checkpoints, and the tested one is the best.
    assert Path(report["best_checkpoint"]).is_file() and Path(report["last_checkpoint"]).name == "last.ckpt"
    assert report["tested_checkpoint"] == report["best_checkpoint"]
    assert (out / "config.yaml").is_file()
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[gpudl]")]
    assert len(summary) == 1 and f"[gpudl] {experiment}: test/" in summary[0]
    if "gan" in experiment:
        # The FIDs reach metrics.json with the test metrics; real vs real sits far below the untrained generator.
        assert {key: report["metrics"][key] for key in GAN_FID} == {key: metrics[key] for key in GAN_FID}
        assert 0 <= metrics["baseline/fid_floor"] < metrics["baseline/fid"]


def test_gan_trains_logs_quality_and_saves_sample_grids(tmp_path):
    metrics, out = run(tmp_path, "experiment=gan_digits", "trainer.max_epochs=2", *GAN_FAST)
    for key in ["train/d_loss", "train/g_loss", "val/gen_score", "test/gen_confidence", "test/gen_classes",
                "baseline/gen_confidence", "baseline/gen_classes", "judge/acc"]:
        assert key in metrics, key
    grids = sorted((out / "samples").glob("epoch_*.png"))
    assert [p.name for p in grids] == ["epoch_000.png", "epoch_001.png"]
    from PIL import Image

    assert min(Image.open(grids[0]).size) >= 256  # 8x8 digits upscaled to be readable

    # A sweep ranks GAN runs by the best epoch's score, the best checkpoint's (as classifiers by val/acc_best).
    report = read_report(out)
    assert report["optimized_metric"] == "val/gen_score_best"
    states = torch.load(report["best_checkpoint"], weights_only=True)["callbacks"]
    (best_score,) = [state["best_model_score"] for key, state in states.items() if "val/gen_score" in key]
    assert report["optimized_metric_value"] == metrics["val/gen_score_best"] == pytest.approx(float(best_score))
    assert metrics["val/gen_score_best"] >= metrics["val/gen_score"]  # the last epoch's
    # The running best travels in checkpoints (a resumed run keeps it).
    last = torch.load(report["last_checkpoint"], weights_only=True)
    assert last["val_gen_score_best"] == pytest.approx(metrics["val/gen_score_best"])


def test_run_folder_holds_resolved_config_and_csv_logs(tmp_path):
    from omegaconf import OmegaConf

    metrics, out = run(tmp_path, "experiment=linreg_toy", "logger=csv", "optimizer=gd")
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.optimizer.lr == 0.3 and saved.data.batch_size is None  # resolved values
    assert saved.paths.output_dir == str(out)
    assert (out / "csv" / "metrics.csv").is_file()
    hparams = (out / "csv" / "hparams.yaml").read_text()
    assert "optimizer_lr" in hparams and "model/params/total" in hparams  # the whole config is logged


def test_fixed_seed_repeats_metrics_exactly(tmp_path):
    args = ("experiment=cnn_digits", "trainer.limit_train_batches=4", "seed=7")
    first, _ = run(tmp_path / "a", *args)
    second, _ = run(tmp_path / "b", *args)
    assert first == second
    third, _ = run(tmp_path / "c", *args[:-1], "seed=8")
    assert third["train/loss"] != first["train/loss"]


def test_fast_dev_run_tests_current_weights(tmp_path, monkeypatch):
    """No checkpoint in fast_dev_run: the test stage runs the weights training ended with (not
    the initial ones, not a reloaded copy)."""
    from lightning.pytorch.callbacks import Callback

    weights = {}

    class Spy(Callback):
        def _keep(self, name, pl_module):
            weights[name] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

        def on_train_start(self, trainer, pl_module):
            self._keep("initial", pl_module)

        def on_train_end(self, trainer, pl_module):
            self._keep("trained", pl_module)

        def on_test_start(self, trainer, pl_module):
            self._keep("tested", pl_module)

    add_callback(monkeypatch, Spy())
    metrics, out = run(tmp_path, "experiment=logreg_cancer", "debug=fdr", fast=False)
    report = read_report(out)
    assert report["best_checkpoint"] is None and report["tested_checkpoint"] is None  # no checkpoints in fast_dev_run
    assert "test/acc" in metrics
    assert weights["tested"].keys() == weights["trained"].keys()
    assert all(torch.equal(weights["tested"][k], v) for k, v in weights["trained"].items())
    assert any(not torch.equal(weights["initial"][k], v) for k, v in weights["trained"].items()), "nothing trained"


def test_toy_line_tests_its_final_epoch(tmp_path):
    metrics, out = run(tmp_path, "experiment=linreg_toy", "trainer.max_epochs=2")
    report = read_report(out)
    assert Path(report["tested_checkpoint"]).name == "epoch_001.ckpt"  # monitor "step": the final epoch


def test_without_a_monitor_the_last_checkpoint_is_tested(tmp_path):
    metrics, out = run(tmp_path, "experiment=logreg_cancer", "trainer.max_epochs=2",
                       "callbacks.model_checkpoint.monitor=null")
    report = read_report(out)
    assert report["best_checkpoint"] is None
    assert report["tested_checkpoint"] == report["last_checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert torch.load(report["last_checkpoint"], weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("every", [1, 2])
def test_one_checkpoint_serialization_per_save(tmp_path, monkeypatch, every):
    """EpochCheckpoint writes one file per save (every `every` epochs): the best when it improved,
    with last.ckpt a hard link to it, else last.ckpt; last.ckpt always holds the latest save."""
    from gpudl.checkpoints import AtomicCheckpointIO

    saved = []
    original = AtomicCheckpointIO.save_checkpoint

    def counted(self, checkpoint, path, **kwargs):
        saved.append((checkpoint["epoch"], Path(path).name))
        return original(self, checkpoint, path, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counted)
    # Monitoring the epoch in mode min: only the first save is a best, the later ones write last.ckpt.
    metrics, out = run(tmp_path, "experiment=logreg_cancer", "trainer.max_epochs=4",
                       f"callbacks.model_checkpoint.every_n_epochs={every}", "callbacks.model_checkpoint.monitor=epoch",
                       "callbacks.model_checkpoint.mode=min")
    epochs = [e for e in range(4) if (e + 1) % every == 0]
    assert [e for e, _ in saved] == epochs  # one write per save
    assert saved[0][1].startswith("epoch_") and all(name == "last.ckpt" for _, name in saved[1:])
    report = read_report(out)
    best, last = Path(report["best_checkpoint"]), Path(report["last_checkpoint"])
    assert last == out / "checkpoints" / "last.ckpt" and torch.load(last, weights_only=True)["epoch"] == epochs[-1]
    assert torch.load(best, weights_only=True)["epoch"] == epochs[0] and report["tested_checkpoint"] == str(best)


def test_last_checkpoint_links_to_an_improved_best(tmp_path):
    metrics, out = run(tmp_path, "experiment=logreg_cancer", "trainer.max_epochs=2",
                       "callbacks.model_checkpoint.monitor=epoch", "callbacks.model_checkpoint.mode=max")
    report = read_report(out)
    best = Path(report["best_checkpoint"])
    assert best.name.startswith("epoch_001") and torch.load(best, weights_only=True)["epoch"] == 1
    assert os.path.samefile(best, report["last_checkpoint"])  # the same bytes, written once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted([best.name, "last.ckpt"])


def test_epoch_checkpoint_keeps_last_itself():
    from gpudl.callbacks import EpochCheckpoint

    with pytest.raises(ValueError, match="save_last"):
        EpochCheckpoint(save_last=True)
    with pytest.raises(ValueError, match="last_filename"):
        EpochCheckpoint(last_filename="sub/last")


def test_resume_from_checkpoint_and_test_only(tmp_path, caplog):
    _, first = run(tmp_path / "a", "experiment=linreg_toy")
    last = first / "checkpoints" / "last.ckpt"
    metrics, second = run(tmp_path / "b", "experiment=linreg_toy", "trainer.max_epochs=2", f"ckpt_path={last}")
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert "nothing will train" not in caplog.text
    # The finished run's checkpoint with the same max_epochs: nothing to train, and the user is told.
    run(tmp_path / "d", "experiment=linreg_toy", "trainer.max_epochs=1", f"ckpt_path={last}")
    assert (f"ckpt_path={last} has finished 1 epoch(s) and trainer.max_epochs=1: nothing will train, the run only "
            "tests. To train on, set trainer.max_epochs above 1") in caplog.text
    # train=false: only test the given checkpoint.
    only_test, third = run(tmp_path / "c", "experiment=linreg_toy", "train=false", f"ckpt_path={last}")
    assert set(only_test) == {k for k in only_test if k.startswith("test/")}
    assert read_report(third)["tested_checkpoint"] == str(last)


def test_wandb_logger_runs_offline_without_login(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="logs to W&B (the GPU check machine has no wandb)")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no `wandb login` on record
    metrics, out = run(tmp_path, "experiment=gan_digits", "logger=wandb", *GAN_FAST)
    assert os.environ["WANDB_MODE"] == "offline"
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    # The sample grid went to W&B as an image too.
    assert list(wandb_run.glob("files/media/images/samples_*.png"))
    import wandb

    assert wandb.run is None  # finished at the end of the job
    assert "test/gen_score" in metrics


def test_wandb_mode_respects_user_setting(monkeypatch, tmp_path):
    from gpudl.tracking import choose_wandb_mode

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert choose_wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert choose_wandb_mode() == "online" and "WANDB_MODE" not in os.environ


def test_kernel_backend_is_set_for_the_run_and_restored(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    seen = []

    class Spy(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(backend.current_backend())

    add_callback(monkeypatch, Spy())
    before = backend._process_backend
    run(tmp_path, "experiment=linreg_toy", "kernels.backend=torch")
    assert seen == ["torch"]
    assert backend._process_backend == before


def test_unknown_kernel_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"kernels.backend: .*unknown backend 'cuda'"):
        run(tmp_path, "experiment=linreg_toy", "kernels.backend=cuda")


def test_triton_backend_on_a_cpu_without_the_interpreter_is_a_config_error(tmp_path, monkeypatch):
    from gpudl.kernels import registry

    monkeypatch.setattr(registry, "INTERPRET", False)  # as in a shell without TRITON_INTERPRET=1
    with pytest.raises(ConfigError) as info:
        run(tmp_path, "experiment=linreg_toy", "kernels.backend=triton", "trainer.accelerator=cpu")
    message = str(info.value)
    assert message.startswith("kernels.backend=triton runs the Triton kernels, which need a CUDA device") and \
        "this run is on the cpu" in message and "kernels.backend=auto" in message and "TRITON_INTERPRET=1" in message
    assert "\n" not in message and not (tmp_path / "run" / "checkpoints").exists()  # before training
    assert backend.current_backend() != "triton"  # the process's backend is restored


# The two-process DDP test (trainer=ddp_cpu) is tests/test_scale.py::test_ddp_on_two_cpu_processes_matches_one_process.


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "gd"])
def test_toy_line_recovers_slope_and_intercept(optimizer, tmp_path):
    metrics, _ = run(tmp_path, "experiment=linreg_toy", f"optimizer={optimizer}", "logger=none",
                     "trainer.enable_progress_bar=false", fast=False)
    assert metrics["test/slope"] == pytest.approx(2.0, abs=0.05)
    assert metrics["test/intercept"] == pytest.approx(1.0, abs=0.05)

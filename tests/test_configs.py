"""The Hydra configs in conf/ compose, and compose into what train() expects (no training here)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gpudl.config import check_model_fits_data, validate_config  # noqa: E402
from gpudl.utils import compose, config_dir  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
REQUIRED_EXPERIMENTS = {
    "linreg_diabetes", "linreg_toy", "logreg_cancer", "cnn_digits", "cnn_mnist", "rnn_digits",
    "attention_digits", "gan_digits", "gan_mnist", "dcgan_mnist", "gpt_chars",
}


@functools.lru_cache(maxsize=None)
def _datamodule(data_yaml: str):
    # Loading MNIST-5k takes seconds: build each data config once.
    return instantiate(OmegaConf.create(data_yaml))


def test_all_experiments_present():
    assert REQUIRED_EXPERIMENTS <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_fits_its_data(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}"], output_dir=tmp_path)
    validate_config(cfg)  # no '???', every _target_ imports, lr and batch size valid
    assert cfg.task_name == experiment
    assert cfg.paths.output_dir == str(tmp_path)
    assert cfg.callbacks.model_checkpoint.dirpath == f"{tmp_path}/checkpoints"
    assert cfg.logger.wandb.group == experiment and cfg.logger.wandb.project == "gpudl"
    assert cfg.optimized_metric
    assert cfg.trainer.max_epochs >= 1
    # The model's sizes agree with what its data module provides.
    check_model_fits_data(cfg, _datamodule(OmegaConf.to_yaml(cfg.data)))
    if "gan" in experiment:
        assert cfg.callbacks.sample_grid._target_ == "gpudl.callbacks.SampleGridCallback"
        assert cfg.callbacks.model_checkpoint.mode == "max"


def test_default_experiment_is_cnn_digits(tmp_path):
    cfg = compose([], output_dir=tmp_path)
    assert cfg.task_name == "cnn_digits"
    assert cfg.model._target_ == "gpudl.models.CNNModule"
    assert cfg.data._target_ == "gpudl.data.DigitsDataModule"
    assert cfg.logger.wandb._target_.endswith("WandbLogger")  # the default logger


@pytest.mark.parametrize("experiment", ["linreg_diabetes", "linreg_toy", "logreg_cancer"])
def test_optimizer_gd_is_full_batch_plain_gradient_descent(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}", "optimizer=gd"], output_dir=tmp_path)
    opt = cfg.model.optimizer
    assert opt._target_.startswith("gpudl.optim.SGD") and opt._partial_ is True
    assert opt.momentum == 0.0 and opt.lr == cfg.optimizer_lr.gd
    assert cfg.data.batch_size is None
    assert cfg.model.get("scheduler") is None  # fixed learning rate


@pytest.mark.parametrize("name,target", [("sgd", "gpudl.optim.SGD"), ("adam", "torch.optim.Adam")])
def test_optimizer_group_picks_the_experiments_rate(name, target, tmp_path):
    cfg = compose(["experiment=logreg_cancer", f"optimizer={name}"], output_dir=tmp_path)
    assert cfg.model.optimizer._target_.split()[0] == target
    assert cfg.model.optimizer.lr == cfg.optimizer_lr[name]
    assert cfg.data.batch_size is not None


def test_command_line_lr_wins(tmp_path):
    cfg = compose(["experiment=cnn_digits", "optimizer=sgd", "model.optimizer.lr=0.123"], output_dir=tmp_path)
    assert cfg.model.optimizer.lr == 0.123


def test_optimizer_partial_builds_with_plain_types(tmp_path):
    import torch

    cfg = compose(["experiment=gan_digits"], output_dir=tmp_path)
    factory = instantiate(cfg.model.optimizer)
    opt = factory(params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Adam)
    betas = opt.defaults["betas"]
    assert tuple(betas) == (0.5, 0.999) and type(betas) in (list, tuple)  # no ListConfig in checkpoints


def test_cosine_scheduler_spans_max_epochs(tmp_path):
    cfg = compose(["experiment=cnn_digits", "trainer.max_epochs=7"], output_dir=tmp_path)
    assert cfg.model.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert cfg.model.scheduler.T_max == 7
    assert compose(["experiment=cnn_digits", "scheduler=none"], output_dir=tmp_path).model.scheduler is None


@pytest.mark.parametrize(
    "logger,keys", [("wandb", {"wandb"}), ("csv", {"csv"}), ("many", {"wandb", "csv"}), ("none", set())]
)
def test_logger_choices(logger, keys, tmp_path):
    cfg = compose([f"logger={logger}"], output_dir=tmp_path)
    assert set((cfg.get("logger") or {}).keys()) == keys
    for node in (cfg.get("logger") or {}).values():
        assert node.save_dir == str(tmp_path)


@pytest.mark.parametrize("debug", ["fdr", "limit", "overfit", "profiler"])
def test_debug_configs(debug, tmp_path):
    cfg = compose([f"debug={debug}"], output_dir=tmp_path)
    validate_config(cfg)
    assert cfg.task_name == "debug" and cfg.logger is None
    assert cfg.trainer.accelerator == "cpu"
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run is True


def test_hparams_search_is_a_multirun_grid(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hparams_search=lr_grid"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params


def test_output_dirs_and_no_chdir():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["experiment=rnn_digits", "paths.root_dir=/r"], return_hydra_config=True)
    assert cfg.hydra.job.chdir is False
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir.parent == Path("/r/logs/rnn_digits/runs")
    sweep_dir = Path(cfg.hydra.sweep.dir)
    assert sweep_dir.parent == Path("/r/logs/rnn_digits/multiruns")
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"] == "${hydra.job.num}"


def test_kernel_backend_reads_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUDL_BACKEND", "torch")
    assert compose([], output_dir=tmp_path).kernels.backend == "torch"
    monkeypatch.delenv("GPUDL_BACKEND")
    assert compose([], output_dir=tmp_path).kernels.backend == "auto"
    assert compose(["kernels.backend=triton"], output_dir=tmp_path).kernels.backend == "triton"


def test_eval_config_composes(tmp_path):
    cfg = compose(["ckpt_path=/some/where.ckpt"], config_name="eval", output_dir=tmp_path)
    assert cfg.ckpt_path == "/some/where.ckpt" and cfg.task_name == "eval"
    assert cfg.trainer._target_.endswith("Trainer")
    default = compose([], config_name="eval", output_dir=tmp_path)
    assert default.ckpt_path is None and default.run_dir is None  # evaluate() asks for one of them


def test_every_config_folder_ships_in_the_package():
    """pyproject.toml lists each folder of conf/ as a package of gpudl.conf, so a wheel carries it."""
    import tomllib

    from gpudl.utils import repo_root

    packages = set(tomllib.loads((repo_root() / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {p.parent for p in config_dir().rglob("*.yaml")}
    expected = {".".join(["gpudl.conf", *folder.relative_to(config_dir()).parts]) for folder in folders}
    assert expected <= packages, sorted(expected - packages)

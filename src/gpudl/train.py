"""Training and evaluation, free of Hydra's command line so tests and notebooks can call them with a
composed config (see `gpudl.utils.compose`; the command lines are `gpudl.cli`).

    train(cfg)     build: check the config and the checkpoint to resume from (cfg.ckpt_path: a
                          file, or `last` = <run dir>/checkpoints/last.ckpt), seed, pick the kernel
                          backend, instantiate datamodule, model, callbacks, loggers and trainer;
                   fit;
                   test the best checkpoint;
                   report: metrics.json and config.yaml in the run folder.
                   Returns the metrics (a sweeper optimizes metrics[cfg.optimized_metric]).
    evaluate(cfg)  test a finished run's checkpoint (ckpt_path=<file>, or run_dir=<run dir> for
                   the checkpoint train() tested) with the run's own config.yaml; writes
                   eval_metrics.json in this job's folder and returns the test metrics.

Both run inside `_job`: an error is recorded in the job's JSON file (status failed or
interrupted) and raised, the process's kernel backend is restored, the W&B run is finished.
A configuration mistake raises ConfigError (gpudl.config) before any training step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from gpudl import tracking
from gpudl.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    checkpoint_file,
    checkpoint_paths,
    epochs_done,
    find_run_config,
    load_checkpoint,
    resolve_checkpoint,
    tested_checkpoint,
)
from gpudl.config import (
    ConfigError,
    check_kernel_device,
    check_model_fits_data,
    instantiate,
    instantiate_group,
    set_cpu_threads,
    set_kernel_backend,
    validate_config,
)

__all__ = ["train", "evaluate", "ConfigError", "CheckpointError"]

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; see the module docstring. Returns all metrics as floats.

    Any error (a bad value, a NaN loss, a signal) is first recorded in <run dir>/metrics.json
    with status "failed" (or "interrupted") and the message, then raised: the command line
    decides whether a sweep goes on (fail_fast)."""
    return _job(cfg, _train, "metrics.json")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint of a finished run on that run's test split; see the module docstring."""
    return _job(cfg, _evaluate, "eval_metrics.json")


def _job(cfg: DictConfig, body: Callable[[DictConfig], tuple[dict[str, float], str]], record: str) -> dict[str, float]:
    """Run `body(cfg) -> (metrics, summary line)`; on any error write the failure into
    <run dir>/<record> and raise it; always restore the kernel backend and finish the W&B run."""
    from gpudl import backend

    previous_backend = backend.process_backend()
    failed = True
    try:
        metrics, summary = body(cfg)
        failed = False
    except BaseException as err:
        tracking.record_failure(cfg, err, record)
        raise
    finally:
        backend.set_backend(previous_backend)
        tracking.finish_wandb(failed)
    if summary:  # last, after W&B's own closing lines
        log.info(summary)
        print(summary, flush=True)
    return metrics


# --------------------------------------------------------------------------- train
@dataclass
class _Run:
    """What `_build` made for one training job."""

    output_dir: Path
    datamodule: Any
    model: Any
    trainer: Any
    ckpt_path: str | None  # the checkpoint fit resumes from
    wandb_args: dict[str, dict[str, Any]]
    overrides: list[str]
    fit_time_s: float = 0.0  # the training phase: fit (training and validation), not building or testing


def _train(cfg: DictConfig) -> tuple[dict[str, float], str]:
    start = time.time()
    run = _build(cfg)
    fit_metrics = _fit(cfg, run)
    # Read before testing: testing a checkpoint brings back the checkpoint callbacks' state saved in it.
    best, last = checkpoint_paths(run.trainer)
    tested, test_metrics = _test(cfg, run, best or last or None)
    return _report(cfg, run, {**fit_metrics, **test_metrics}, (best, last, tested), time.time() - start)


def _build(cfg: DictConfig) -> _Run:
    """Check everything that can be checked, then instantiate. Checks that need no object come
    first, so a mistake costs no data loading, and a missing or corrupted checkpoint stops the
    run before anything is built or written."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)
    resumed = _progress(load_checkpoint(ckpt)) if ckpt else None
    set_kernel_backend(cfg)
    _reset_backend_record()
    set_cpu_threads(cfg)
    if tracking.wandb_logger_names(cfg):
        log.info("W&B mode: %s", tracking.choose_wandb_mode())
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir.mkdir(parents=True, exist_ok=True)

    log.info("Building datamodule <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data, "data")
    check_model_fits_data(cfg, datamodule)
    log.info("Building model <%s>", cfg.model._target_)
    model = instantiate(cfg.model, "model")
    if cfg.get("compile") and cfg.compile.get("enabled"):
        _compile(model, cfg.compile)
    job = tracking.hydra_job()
    wandb_args = tracking.wandb_arguments(cfg, output_dir, ckpt, job)
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_group(cfg.get("logger"), "logger", extra=wandb_args)
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback then
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    log.info("Building trainer <%s>", cfg.trainer._target_)
    trainer_kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    if cfg.trainer.get("plugins") is None:
        trainer_kwargs["plugins"] = [AtomicCheckpointIO()]  # a kill while saving never truncates a checkpoint
    trainer = instantiate(cfg.trainer, "trainer", **trainer_kwargs)
    check_kernel_device(cfg, trainer.strategy.root_device.type)
    if resumed is not None and cfg.get("train", True):
        _warn_if_nothing_trains(ckpt, *resumed, trainer)

    # The run's resolved config: in the run folder (evaluate rebuilds the run from it) and in every logger.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if _is_global_zero(trainer):
        tracking.save_wandb_id(output_dir, wandb_args)
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    if loggers:
        hparams = dict(resolved)
        # The W&B entries as the run got them: in a multirun, group <experiment>-<sweep> and job_type.
        for name, args in wandb_args.items():
            shown = {k: args[k] for k in ("group", "job_type") if k in args}
            hparams["logger"] = {**hparams["logger"], name: {**hparams["logger"][name], **shown}}
        hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
        hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
    return _Run(output_dir, datamodule, model, trainer, str(ckpt) if ckpt else None, wandb_args,
                job.get("overrides", []))


def _compile(model: Any, options: DictConfig) -> None:
    """torch.compile the model in place for this run (config group `compile`): its forward, or the
    modules its `compiled_modules()` names (the GAN's two networks, which its training step calls
    directly). In place, so the LightningModule, its checkpoints and state_dict keys are unchanged;
    the backward is compiled with the forward (AOT autograd)."""
    kwargs = {k: options.get(k) for k in ("backend", "mode", "fullgraph", "dynamic")}
    # Dynamo counts recompilations per code object for the whole process: the jobs of a sweep (or
    # tests) that run in one process would add up to its limit and, with fullgraph, fail. A run
    # starts from a clean slate.
    import torch._dynamo

    torch._dynamo.reset()
    targets = model.compiled_modules() if hasattr(model, "compiled_modules") else [model]
    log.info("torch.compile %s with %s", ", ".join(type(m).__name__ for m in targets), kwargs)
    for module in targets:
        module.compile(**kwargs)


def _progress(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """(epochs finished, global step) of a checkpoint to resume from."""
    return epochs_done(checkpoint), int(checkpoint.get("global_step", 0))


def _warn_if_nothing_trains(ckpt: Path, epochs: int, step: int, trainer: Any) -> None:
    """Resuming a finished run with the same trainer.max_epochs trains nothing and only tests."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and 0 <= max_epochs <= epochs:
        limit, value, done = "trainer.max_epochs", max_epochs, f"{epochs} epoch(s)"
    elif max_steps is not None and 0 <= max_steps <= step:
        limit, value, done = "trainer.max_steps", max_steps, f"{step} step(s)"
    else:
        return
    log.warning("ckpt_path=%s has finished %s and %s=%s: nothing will train, the run only tests. To train on, "
                "set %s above %s", ckpt, done, limit, value, limit, value)


def _fit(cfg: DictConfig, run: _Run) -> dict[str, float]:
    if not cfg.get("train", True):
        return {}
    log.info("Training")
    if run.ckpt_path:
        log.info("Resuming from %s", run.ckpt_path)
    start = time.perf_counter()
    run.trainer.fit(model=run.model, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    run.fit_time_s = time.perf_counter() - start
    return _floats(run.trainer.callback_metrics)


def _test(cfg: DictConfig, run: _Run, saved: str | None) -> tuple[str | None, dict[str, float]]:
    """Test the `saved` checkpoint (the best, or the last one without a monitor; with train=false,
    cfg.ckpt_path). Returns (the tested checkpoint or None for the current weights, the metrics)."""
    if not cfg.get("test", True):
        return None, {}
    if cfg.get("train", True):
        tested = saved
        if tested is None:
            log.warning("No checkpoint was saved (fast_dev_run or no ModelCheckpoint): testing the current weights")
    else:
        tested = run.ckpt_path
    log.info("Testing %s", tested or "the current weights")
    tester = run.trainer
    if _spawned(run.trainer):
        # ddp_spawn trained in child processes; this (main) process tests on one device:
        # every test sample counted once (a DistributedSampler pads with repeats), no second spawn.
        # Fresh loggers: the same W&B run (its id), and CSV rows in <run dir>/csv/test/ (the
        # child's csv/metrics.csv has columns this process's CSVLogger does not know).
        extra = dict(run.wandb_args)
        for name, entry in (cfg.get("logger") or {}).items():
            if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith("CSVLogger"):
                extra[name] = {"version": "test"}
        test_loggers = instantiate_group(cfg.get("logger"), "logger", extra=extra)
        tester = instantiate(cfg.trainer, "trainer", devices=1, num_nodes=1, strategy="auto", callbacks=[],
                             logger=test_loggers or False, enable_checkpointing=False)
    tester.test(model=run.model, datamodule=run.datamodule, ckpt_path=tested, weights_only=True)
    return tested, _floats(tester.callback_metrics)


def _report(cfg: DictConfig, run: _Run, metrics: dict[str, float], checkpoints: tuple[str, str, str | None],
            wall: float) -> tuple[dict[str, float], str]:
    """Write <run dir>/metrics.json (rank 0) and return (metrics, the summary line).
    `checkpoints`: the best, last and tested checkpoint files ('' or None when none)."""
    name = cfg.get("optimized_metric")
    value = metrics.get(name) if name else None
    if name and value is None:
        log.warning("optimized_metric %r was not logged; logged metrics: %s", name, ", ".join(sorted(metrics)))
    if not _is_global_zero(run.trainer):
        return metrics, ""
    best, last, tested = checkpoints
    kernels = _backend_report()
    tracking.log_backend_summary(run.trainer.loggers, kernels)
    tracking.write_record(run.output_dir / "metrics.json", {
        "status": "ok",
        "task_name": cfg.get("task_name"),
        "overrides": run.overrides,
        "resumed_from": run.ckpt_path,
        "metrics": metrics,
        "optimized_metric": name,
        "optimized_metric_value": value,
        "best_checkpoint": best or None,
        "last_checkpoint": last or None,
        "tested_checkpoint": tested,
        "seed": cfg.get("seed"),
        "wall_time_s": round(wall, 3),
        "fit_time_s": round(run.fit_time_s, 3),
        "global_step": int(getattr(run.trainer, "global_step", 0)),
        "kernel_backend": kernels,
    })
    extra = f" | {name}={value:.4f}" if value is not None else ""
    return metrics, _summary(cfg.get("task_name", "train"), metrics, f"{extra} | {wall:.1f}s | {run.output_dir}")


# --------------------------------------------------------------------------- evaluate
def _evaluate(cfg: DictConfig) -> tuple[dict[str, float], str]:
    import lightning as L

    validate_config(cfg, required=("trainer",))
    ckpt_path, run_config = _eval_inputs(cfg)
    checkpoint = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.load(run_config)
    for key in ("data", "model"):
        if "_target_" not in run_cfg.get(key, {}):
            raise ConfigError(
                f"run_config: {run_config} has no `{key}._target_`; is it a config.yaml written by train()?"
            )
    set_kernel_backend(cfg)
    set_cpu_threads(cfg)
    if tracking.wandb_logger_names(cfg):
        log.info("W&B mode: %s", tracking.choose_wandb_mode())
    seed = cfg.get("seed") if cfg.get("seed") is not None else run_cfg.get("seed")
    if seed is not None:
        L.seed_everything(seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(run_cfg.data, "data")
    model = instantiate(run_cfg.model, "model")
    model.on_load_checkpoint(checkpoint)  # modules may restore extra state here
    model.load_state_dict(checkpoint["state_dict"])
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, "trainer", logger=loggers or False, callbacks=[], enable_checkpointing=False)
    check_kernel_device(cfg, trainer.strategy.root_device.type)

    trainer.test(model=model, datamodule=datamodule)
    metrics = _floats(trainer.callback_metrics)
    if not _is_global_zero(trainer):
        return metrics, ""
    tracking.write_record(output_dir / "eval_metrics.json", {
        "status": "ok", "ckpt_path": str(ckpt_path), "run_config": str(run_config), "metrics": metrics,
    })
    return metrics, _summary(f"eval {run_cfg.get('task_name', '')}".strip(), metrics, f" | {ckpt_path}")


def _eval_inputs(cfg: DictConfig) -> tuple[Path, Path]:
    """(checkpoint file, the run's config.yaml) from ckpt_path=<file> or run_dir=<run dir>."""
    ckpt, run_dir = cfg.get("ckpt_path"), cfg.get("run_dir")
    if bool(ckpt) == bool(run_dir):
        given = "both" if ckpt else "neither"
        raise ConfigError(
            f"evaluate needs one of ckpt_path=<file.ckpt> or run_dir=<run dir> (the checkpoint the run tested), "
            f"got {given}"
        )
    ckpt_path = checkpoint_file(ckpt) if ckpt else checkpoint_file(tested_checkpoint(run_dir))
    if cfg.get("run_config"):
        run_config = Path(cfg.run_config)
    elif run_dir:
        run_config = Path(run_dir) / "config.yaml"
    else:
        run_config = find_run_config(ckpt_path)
    if not run_config.is_file():
        raise ConfigError(f"run_config: {run_config} does not exist; expected the run's config.yaml")
    return ckpt_path, run_config


# --------------------------------------------------------------------------- small helpers
def _reset_backend_record() -> None:
    """Start this job's record of which kernel backend ran each op (a sweep runs many jobs per process)."""
    from gpudl import backend

    backend.reset_record()


def _backend_report() -> dict[str, Any]:
    """Which backend ran each op in this process (with ddp_spawn: the process that tests), and
    under `auto` on a GPU each measured key with its times; see docs/backends.md."""
    from gpudl import backend

    return backend.report()


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    import torch

    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.item())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _spawned(trainer: Any) -> bool:
    """True when the trainer runs fit in spawned child processes (ddp_spawn with > 1 process)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher" and getattr(trainer, "world_size", 1) > 1


def _is_global_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def _summary(name: str, metrics: dict[str, float], extra: str = "") -> str:
    tests = {k: v for k, v in metrics.items() if k.startswith("test/")}
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(tests.items())) or "no test metrics"
    return f"[gpudl] {name}: {shown}{extra}"

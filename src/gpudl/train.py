"""Training and evaluation entry points, free of Hydra's command line so tests and notebooks can
call them with a composed config (see `gpudl.utils.compose`).

    train(cfg)     check the config, seed, pick the kernel backend, build datamodule, model,
                   callbacks, loggers and trainer from their `_target_`s, fit (resuming from
                   cfg.ckpt_path: a file, or `last` = <run dir>/checkpoints/last.ckpt), test the
                   best checkpoint, write metrics.json (status ok, or failed/interrupted with the
                   error) and config.yaml in the run folder; returns the metrics (a sweeper
                   optimizes metrics[cfg.optimized_metric]).
    evaluate(cfg)  rebuild a finished run from its config.yaml, load a checkpoint's weights and
                   test them; returns the test metrics.

Every mistake in the config that can be seen before training (a missing '???' value, an unknown
`_target_`, a non-positive learning rate or batch size, a missing data file, a model that does
not fit the data) raises ConfigError, one message naming the key, before any training step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The configuration cannot run; the message names the key and what was expected."""


class CheckpointError(ConfigError):
    """A checkpoint given to resume or test from cannot be read (missing, truncated, corrupted,
    or not a Lightning checkpoint); the message names the file."""


WANDB_ID_FILE = "wandb_id.txt"  # in the run folder: the W&B run a resumed run continues


# --------------------------------------------------------------------------- config checks
def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (dotted key, parent node, key) for every entry below `node`, without resolving."""
    if isinstance(node, DictConfig):
        items = [(k, k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(i, str(i)) for i in range(len(node))]
    else:
        return
    for key, name in items:
        dotted = f"{prefix}.{name}" if prefix else str(name)
        yield dotted, node, key
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
            yield from _walk(child, dotted)


def _locate(target: str) -> Any:
    """Import a dotted path ('pkg.module.Class'); raise ImportError saying which part is missing
    (with close names when one is misspelled)."""
    import difflib
    import importlib

    parts = target.split(".")
    if not all(parts):
        raise ImportError("expected a dotted path such as 'gpudl.models.CNNModule'")
    obj, found = None, 0
    for i in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj, found = importlib.import_module(".".join(parts[:i])), i
            break
        except ModuleNotFoundError as err:
            if err.name is None or not ".".join(parts[:i]).startswith(err.name):
                raise  # a module that exists but fails inside on a missing dependency
    if obj is None:
        raise ImportError(f"no module named {parts[0]!r}")
    for i in range(found, len(parts)):
        if not hasattr(obj, parts[i]):
            close = difflib.get_close_matches(parts[i], [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(repr('.'.join(parts[:i] + [c])) for c in close)}?" if close else ""
            raise ImportError(f"{'.'.join(parts[:i])!r} has no attribute {parts[i]!r}{hint}")
        obj = getattr(obj, parts[i])
    return obj


def validate_config(cfg: DictConfig, required: tuple[str, ...] = ("data", "model", "trainer")) -> None:
    """Raise ConfigError for mistakes visible before anything is built."""
    missing = [k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra.")]
    if missing:
        raise ConfigError(
            "missing required value(s): "
            + ", ".join(sorted(missing))
            + " (marked '???' in the config; set them on the command line, e.g. "
            + f"`{sorted(missing)[0]}=...`)"
        )
    try:  # every interpolation must resolve (e.g. ${optimizer_lr.adam})
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"cannot resolve config key {key!r}: {err}") from None

    for key in required:
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            got = None if node is None else OmegaConf.to_yaml(node).strip() if isinstance(node, DictConfig) else node
            raise ConfigError(f"`{key}` must be a config with a `_target_` (got {got!r}); pick one, e.g. {key}=<name>")

    for dotted, parent, key in _walk(cfg):
        if dotted.startswith("hydra."):
            continue
        value = parent[key]
        if key == "_target_":
            if not isinstance(value, str):
                raise ConfigError(f"{dotted}: expected a dotted import path, got {value!r}")
            try:
                _locate(value)
            except Exception as err:  # ImportError, AttributeError, ...
                raise ConfigError(f"{dotted}: unknown target {value!r}: {err}") from None
        elif key == "lr" and dotted.startswith("model."):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{dotted} must be a positive number (the learning rate), got {value!r}")

    batch_size = cfg.data.get("batch_size", None) if "data" in cfg else None
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"data.batch_size must be a positive int, or null for full batch, got {batch_size!r}")
    metric = cfg.get("optimized_metric")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(f"optimized_metric must be a metric name such as 'val/acc', got {metric!r}")


def _check_model_fits_data(cfg: DictConfig, datamodule: Any) -> None:
    """The model's input/output sizes are config values; compare them with what the data holds
    (e.g. after data.path=<your file> with other sizes) before the model is built."""
    model = cfg.model
    expected: dict[str, Any] = {}
    for attr in ("num_features", "num_classes"):
        if hasattr(datamodule, attr):
            expected[attr] = getattr(datamodule, attr)
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None:
        shape = [int(s) for s in shape]
        expected.update(image_shape=shape, in_channels=shape[0], image_size=shape[-1])
        if "input_size" in model:  # the RNN reads one image row per step
            expected["input_size"] = shape[-1]
    for attr, value in expected.items():
        if attr not in model or model[attr] is None:
            continue
        got = model[attr]
        got = [int(v) for v in got] if isinstance(got, ListConfig) else got
        if got != value:
            hint = f"{attr}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{attr}={value}"
            raise ConfigError(
                f"model.{attr}={got} does not fit the data: {cfg.data._target_} provides {attr}={value}; "
                f"set model.{hint}"
            )


# --------------------------------------------------------------------------- building objects
def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        text = str(cause)
        # Name the config keys the constructor complained about: by name (batch_size) or by
        # value (data.path=/nope.npz), so the user knows what to change.
        involved = [
            f"{key}.{k}={node[k]!r}" if isinstance(node[k], str) else f"{key}.{k}"
            for k in node
            if not str(k).startswith("_")
            and (re.search(rf"\b{re.escape(str(k))}\b", text) or (isinstance(node[k], str) and node[k] and node[k] in text))
        ]
        where = f" [check {', '.join(involved)}]" if involved else ""
        raise ConfigError(f"could not build `{key}` ({node.get('_target_')}){where}: {type(cause).__name__}: {cause}") from cause


def _instantiate_group(node: DictConfig | None, key: str, extra: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """Build every entry of callbacks/logger that has a `_target_` (entries left without one,
    e.g. an experiment's callbacks.model_checkpoint.monitor after callbacks=none, are skipped).
    `extra[name]` holds keyword arguments for entry `name` that override its config."""
    extra = extra or {}
    objects = []
    if node is None:
        return objects
    if not isinstance(node, DictConfig):
        raise ConfigError(f"`{key}` must be a mapping of name -> config with `_target_`, got {node!r}")
    for name, entry in node.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            objects.append(_instantiate(entry, f"{key}.{name}", **extra.get(name, {})))
        elif entry is not None:
            log.info("%s.%s has no _target_; skipped", key, name)
    return objects


def _uses_wandb(cfg: DictConfig) -> bool:
    node = cfg.get("logger")
    return isinstance(node, DictConfig) and any(
        isinstance(v, DictConfig) and str(v.get("_target_", "")).endswith("WandbLogger") for v in node.values()
    )


def _finish_wandb(failed: bool) -> None:
    """Close the W&B run of this job (a multirun starts a new one per job)."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def _hydra_job() -> dict[str, Any]:
    """What Hydra knows about this job: multirun or not, the sweep folder's name, the job's
    command-line overrides. Empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        multirun = str(hc.get("mode")) == "RunMode.MULTIRUN"
        overrides = [str(o) for o in (hc.overrides.task or [])] if "overrides" in hc else []
        return {"multirun": multirun, "overrides": overrides}
    except Exception:  # a partial Hydra config (e.g. built by hand): no job information
        return {}


def _wandb_logger_names(cfg: DictConfig) -> list[str]:
    node = cfg.get("logger")
    if not isinstance(node, DictConfig):
        return []
    return [k for k, v in node.items() if isinstance(v, DictConfig) and str(v.get("_target_", "")).endswith("WandbLogger")]


def _wandb_arguments(cfg: DictConfig, output_dir: Path, ckpt_path: str | None, job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per W&B logger entry: the run id (kept in <run dir>/wandb_id.txt; a resumed run reads it
    from its own folder or the checkpoint's run folder and continues that W&B run), and in a
    multirun group = <group>-<sweep folder name> (one group per sweep) and job_type = the job's
    overrides."""
    names = _wandb_logger_names(cfg)
    if not names:
        return {}
    import secrets
    import string

    run_id = None
    if ckpt_path:
        for folder in (output_dir, Path(ckpt_path).resolve().parent.parent):
            saved = folder / WANDB_ID_FILE
            if saved.is_file() and saved.read_text().strip():
                run_id = saved.read_text().strip()
                break
    out = {}
    for name in names:
        node = cfg.logger[name]
        args: dict[str, Any] = {"id": node.get("id") or run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)), "resume": "allow"}
        if job.get("multirun"):
            args["group"] = f"{node.get('group') or cfg.get('task_name')}-{output_dir.parent.name}"
            overrides = [o for o in job.get("overrides", []) if not o.startswith("experiment=")]
            args["job_type"] = (",".join(overrides) or "train")[:64]  # W&B's limit
        out[name] = args
    return out


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def resolve_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """The checkpoint file to resume or test from: None, `last` (<output_dir>/checkpoints/last.ckpt)
    or a path; checked now with torch.load(weights_only=True) (CheckpointError naming the file
    when it is missing, truncated, corrupted or holds objects that would need code to load)."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint {path}; `last` means this run folder's last.ckpt: to continue an "
                "earlier run, run in its folder (hydra.run.dir=<run dir> ckpt_path=last) or pass ckpt_path=<file>"
            )
    else:
        path = Path(ckpt_path)
    load_checkpoint(path)
    return str(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, weights_only=True) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: checkpoint file {path} does not exist; expected a .ckpt written by train()")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"ckpt_path: cannot load checkpoint {path} (truncated, corrupted, or not a checkpoint written by "
            f"train()): torch.load(weights_only=True) failed: {type(err).__name__}: {first}. Nothing was written; "
            f"the other checkpoints in {path.parent} are untouched"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path: {path} holds no 'state_dict'; expected a Lightning checkpoint written by train()")
    return checkpoint


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.item())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _checkpoint_paths(trainer: Any) -> tuple[str, str]:
    """(best, last) checkpoint paths ('' when none): the best of the ModelCheckpoint that
    monitors a metric; the last is a save_last file, or the file of a ModelCheckpoint without
    a monitor (callbacks.last_checkpoint keeps the latest epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    best = next((cb.best_model_path for cb in checkpoints if cb.monitor and cb.best_model_path), "")
    lasts = [cb.last_model_path for cb in checkpoints] + [cb.best_model_path for cb in checkpoints if not cb.monitor]
    lasts = sorted((p for p in lasts if p), key=lambda p: os.path.basename(p) != "last.ckpt")  # same state; prefer the usual name
    return best, lasts[0] if lasts else ""


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


# --------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; see the module docstring. Returns all metrics as floats.

    Any error (a bad value, a NaN loss, a signal) is first recorded in <run dir>/metrics.json
    with status "failed" (or "interrupted") and the message, then raised: scripts/train.py
    decides whether a sweep goes on (fail_fast)."""
    from gpudl import backend

    previous_backend = backend.process_backend()
    failed = True
    try:
        validate_config(cfg)
        if _uses_wandb(cfg):
            from gpudl.utils import choose_wandb_mode

            mode = choose_wandb_mode()
            log.info("W&B mode: %s", mode)
        metrics, summary = _train(cfg)
        failed = False
    except BaseException as err:
        _record_failure(cfg, err)
        raise
    finally:
        backend.set_backend(previous_backend)
        _finish_wandb(failed)
    if summary:  # last, after W&B's own closing lines
        log.info(summary)
        print(summary, flush=True)
    return metrics


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """metrics.json of a failed job: status, error type and message, the job's overrides."""
    from gpudl.callbacks import TrainingInterrupted

    if _rank() != 0:
        return
    try:
        output_dir = Path(cfg.paths.output_dir)
    except Exception:
        return  # no run folder to write into
    interrupted = isinstance(err, (TrainingInterrupted, KeyboardInterrupt))
    report = {
        "status": "interrupted" if interrupted else "failed",
        "error_type": type(err).__name__,
        "error": str(err),
        "task_name": cfg.get("task_name"),
        "overrides": _hydra_job().get("overrides", []),
        "metrics": {},
        "optimized_metric": cfg.get("optimized_metric") if isinstance(cfg.get("optimized_metric", None), str) else None,
        "optimized_metric_value": None,
        "seed": cfg.get("seed", None),
    }
    if isinstance(err, TrainingInterrupted):
        report["last_checkpoint"] = err.checkpoint
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    except OSError as os_err:
        log.warning("could not record the failure in %s: %s", output_dir, os_err)


def _train(cfg: DictConfig) -> tuple[dict[str, float], str]:
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    from gpudl import backend

    start = time.time()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("kernels") is not None and cfg.kernels.get("backend") is not None:
        try:
            backend.set_backend(cfg.kernels.backend)
        except ValueError as err:
            raise ConfigError(f"kernels.backend: {err}") from None
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    log.info("Building datamodule <%s>", cfg.data._target_)
    datamodule = _instantiate(cfg.data, "data")
    _check_model_fits_data(cfg, datamodule)
    log.info("Building model <%s>", cfg.model._target_)
    model = _instantiate(cfg.model, "model")
    # Resolved (and checked) before anything is built or written: a bad checkpoint stops here.
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)
    job = _hydra_job()
    wandb_args = _wandb_arguments(cfg, output_dir, ckpt_path, job)
    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = _instantiate_group(cfg.get("logger"), "logger", extra=wandb_args)
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    log.info("Building trainer <%s>", cfg.trainer._target_)
    trainer_kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    if cfg.trainer.get("plugins") is None:
        from gpudl.callbacks import AtomicCheckpointIO

        trainer_kwargs["plugins"] = [AtomicCheckpointIO()]  # a kill while saving never truncates a checkpoint
    trainer = _instantiate(cfg.trainer, "trainer", **trainer_kwargs)
    if wandb_args and _is_global_zero(trainer):
        (output_dir / WANDB_ID_FILE).write_text(next(iter(wandb_args.values()))["id"] + "\n")

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if _is_global_zero(trainer):
        OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")
    if loggers:
        hparams = dict(resolved)
        hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
        hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)

    fit_metrics: dict[str, float] = {}
    if cfg.get("train", True):
        log.info("Training")
        if ckpt_path:
            log.info("Resuming from %s", ckpt_path)
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_metrics = _floats(trainer.callback_metrics)

    best, last = _checkpoint_paths(trainer)
    tested_ckpt: str | None = None
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        if cfg.get("train", True):
            # The best checkpoint by the monitored metric; without a monitor, the last one.
            tested_ckpt = best or last or None
            if tested_ckpt is None:
                log.warning("No checkpoint was saved (fast_dev_run or no ModelCheckpoint): testing the current weights")
        else:
            tested_ckpt = ckpt_path
        log.info("Testing %s", tested_ckpt or "the current weights")
        tester = trainer
        if _spawned(trainer):
            # ddp_spawn trained in child processes; this (main) process tests on one device:
            # every test sample counted once (a DistributedSampler pads with repeats), no second spawn.
            # Fresh loggers: the same W&B run (its id), and CSV rows in <run dir>/csv/test/ (the
            # child's csv/metrics.csv has columns this process's CSVLogger does not know).
            extra = dict(wandb_args)
            for name, entry in (cfg.get("logger") or {}).items():
                if isinstance(entry, DictConfig) and str(entry.get("_target_", "")).endswith("CSVLogger"):
                    extra[name] = {"version": "test"}
            test_loggers = _instantiate_group(cfg.get("logger"), "logger", extra=extra)
            tester = _instantiate(cfg.trainer, "trainer", devices=1, num_nodes=1, strategy="auto", callbacks=[],
                                  logger=test_loggers or False, enable_checkpointing=False)
        tester.test(model=model, datamodule=datamodule, ckpt_path=tested_ckpt, weights_only=True)
        trainer = tester
        test_metrics = _floats(trainer.callback_metrics)

    metrics = {**fit_metrics, **test_metrics}
    wall = time.time() - start
    name = cfg.get("optimized_metric")
    value = metrics.get(name) if name else None
    if name and value is None:
        log.warning("optimized_metric %r was not logged; logged metrics: %s", name, ", ".join(sorted(metrics)))
    summary = ""
    if _is_global_zero(trainer):
        report = {
            "status": "ok",
            "task_name": cfg.get("task_name"),
            "overrides": job.get("overrides", []),
            "resumed_from": ckpt_path,
            "metrics": metrics,
            "optimized_metric": name,
            "optimized_metric_value": value,
            "best_checkpoint": best or None,
            "last_checkpoint": last or None,
            "tested_checkpoint": tested_ckpt,
            "seed": cfg.get("seed"),
            "wall_time_s": round(wall, 3),
        }
        (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        extra = f" | {name}={value:.4f}" if value is not None else ""
        summary = _summary(cfg.get("task_name", "train"), metrics, f"{extra} | {wall:.1f}s | {output_dir}")
    return metrics, summary


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimizes, or None (with a warning) when it was not logged."""
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric %r not found among the logged metrics (%s)", name, ", ".join(sorted(metrics)))
        return None
    return metrics[name]


# --------------------------------------------------------------------------- evaluate
def find_run_config(ckpt_path: str | os.PathLike) -> Path:
    """The config.yaml that train() wrote in the run folder of this checkpoint
    (<run dir>/checkpoints/<name>.ckpt -> <run dir>/config.yaml)."""
    ckpt = Path(ckpt_path).resolve()
    for folder in (ckpt.parent, *ckpt.parents):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
        if (folder / ".hydra").is_dir():
            break
    raise ConfigError(
        f"ckpt_path: found no config.yaml of the run next to {ckpt_path} (expected <run dir>/config.yaml as "
        "written by train()); pass run_config=<path to config.yaml>"
    )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint of a finished run on that run's test split.

    Reads the run's resolved config (cfg.run_config, or <run dir>/config.yaml next to the
    checkpoint), rebuilds its datamodule and model, loads the weights with
    torch.load(weights_only=True), runs trainer.test, writes eval_metrics.json in this job's
    output folder and returns the test metrics.
    """
    validate_config(cfg, required=("trainer",))
    import lightning as L

    from gpudl import backend

    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path or not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path: checkpoint file {ckpt_path!r} does not exist; expected a .ckpt written by train()")
    run_config = Path(cfg.run_config) if cfg.get("run_config") else find_run_config(ckpt_path)
    if not run_config.is_file():
        raise ConfigError(f"run_config: {run_config} does not exist; expected the run's config.yaml")
    run_cfg = OmegaConf.load(run_config)
    for key in ("data", "model"):
        if "_target_" not in run_cfg.get(key, {}):
            raise ConfigError(f"run_config: {run_config} has no `{key}._target_`; is it a config.yaml written by train()?")

    seed = cfg.get("seed") if cfg.get("seed") is not None else run_cfg.get("seed")
    if seed is not None:
        L.seed_everything(seed, workers=True)
    previous_backend = backend.process_backend()
    try:
        if cfg.get("kernels") is not None and cfg.kernels.get("backend") is not None:
            backend.set_backend(cfg.kernels.backend)
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        datamodule = _instantiate(run_cfg.data, "data")
        model = _instantiate(run_cfg.model, "model")
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"ckpt_path: could not load {ckpt_path} with torch.load(weights_only=True): {err}") from err
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ConfigError(f"ckpt_path: {ckpt_path} holds no 'state_dict'; expected a Lightning checkpoint")
        model.on_load_checkpoint(checkpoint)  # modules may restore extra state here
        model.load_state_dict(checkpoint["state_dict"])

        loggers = _instantiate_group(cfg.get("logger"), "logger")
        trainer = _instantiate(cfg.trainer, "trainer", logger=loggers or False, callbacks=[], enable_checkpointing=False)
        trainer.test(model=model, datamodule=datamodule)
        metrics = _floats(trainer.callback_metrics)
        if _is_global_zero(trainer):
            report = {"ckpt_path": str(ckpt_path), "run_config": str(run_config), "metrics": metrics}
            (output_dir / "eval_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
            print(_summary(f"eval {run_cfg.get('task_name', '')}".strip(), metrics, f" | {ckpt_path}"), flush=True)
        return metrics
    finally:
        backend.set_backend(previous_backend)
        _finish_wandb(failed=False)

"""Checkpoints: which file a run resumes or tests from, reading one safely, writing one atomically,
and finding a finished run's files.

    resolve_checkpoint(ckpt_path, run dir)  None, `last` (<run dir>/checkpoints/last.ckpt) or a file
    load_checkpoint(path)                   torch.load(weights_only=True), errors naming the file
    checkpoint_file(path)                   the file, or an error when it does not exist
    epochs_done(checkpoint)                 how many epochs a checkpoint has finished
    checkpoint_paths(trainer)               (best, last) files of a trainer's ModelCheckpoints
    tested_checkpoint(run dir)              the checkpoint train() tested (from its metrics.json)
    find_run_config(checkpoint)             <run dir>/config.yaml of a checkpoint
    AtomicCheckpointIO                      temp file + rename: never a half-written checkpoint

Checkpoints hold plain types only, so torch.load(weights_only=True) reads them without running
any code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gpudl.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint given to resume or test from cannot be read (missing, truncated, corrupted,
    or not a Lightning checkpoint); the message names the file."""


def resolve_checkpoint(ckpt_path: str | os.PathLike | None, output_dir: Path) -> Path | None:
    """The checkpoint file to resume or test from: None, `last` (<output_dir>/checkpoints/last.ckpt)
    or a path (existence is checked by load_checkpoint)."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) != "last":
        return Path(ckpt_path)
    path = output_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path=last: no checkpoint {path}; `last` means this run folder's last.ckpt: to continue an "
            "earlier run, run in its folder (hydra.run.dir=<run dir> ckpt_path=last) or pass ckpt_path=<file>"
        )
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path` as a Path, or CheckpointError when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path: checkpoint file {str(path)!r} does not exist; expected a .ckpt written by train()"
        )
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(path, weights_only=True) onto the CPU, with errors that name the file."""
    path = checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"ckpt_path: cannot load checkpoint {path} (truncated, corrupted, or not a checkpoint written by "
            f"train()): torch.load(weights_only=True) failed: {type(err).__name__}: {first}. No checkpoint was "
            f"written; the other checkpoints in {path.parent} are untouched"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"ckpt_path: {path} holds no 'state_dict'; expected a Lightning checkpoint written by train()"
        )
    return checkpoint


def epochs_done(checkpoint: dict[str, Any]) -> int:
    """Epochs a Lightning checkpoint has finished: `epoch` is the index of the epoch it was saved in,
    finished when its last batch ran (an end-of-epoch checkpoint) and not when it was saved
    mid-epoch (a preempted run), which a resumed fit completes."""
    epoch = int(checkpoint.get("epoch", 0))
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    return epoch + 1 if progress.get("is_last_batch", True) else epoch


def checkpoint_paths(trainer: Any) -> tuple[str, str]:
    """(best, last) checkpoint paths ('' when none): the best of the ModelCheckpoint that
    monitors a metric; the last is a save_last file, or the file of a ModelCheckpoint without
    a monitor (gpudl.callbacks.EpochCheckpoint keeps <dirpath>/last.ckpt, the latest save)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    best = next((cb.best_model_path for cb in checkpoints if cb.monitor and cb.best_model_path), "")
    lasts = [cb.last_model_path for cb in checkpoints] + [cb.best_model_path for cb in checkpoints if not cb.monitor]
    # The same state under several names: prefer the usual one.
    lasts = sorted((p for p in lasts if p), key=lambda p: os.path.basename(p) != "last.ckpt")
    return best, lasts[0] if lasts else ""


def tested_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint whose test metrics train() recorded in <run_dir>/metrics.json
    (`tested_checkpoint`: the best by the monitored metric, or the last without a monitor). A run
    folder moved since keeps working: the file is looked up in its checkpoints/ folder by name."""
    run_dir = Path(run_dir)
    report_path = run_dir / "metrics.json"
    if not report_path.is_file():
        raise ConfigError(f"run_dir: {run_dir} holds no metrics.json; expected a run folder written by train()")
    report = json.loads(report_path.read_text())
    recorded = report.get("tested_checkpoint")
    if not recorded:
        raise ConfigError(
            f"run_dir: {report_path} names no tested checkpoint (status {report.get('status')!r}; a failed run, or "
            "one without checkpoints such as debug=fdr); pass ckpt_path=<file.ckpt> instead"
        )
    path = Path(recorded)
    moved = run_dir / "checkpoints" / path.name
    return moved if not path.is_file() and moved.is_file() else path


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file next to the target, then os.replace: the checkpoint on
    disk is always either the previous complete file or the new complete file, even when the
    process is killed while saving."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

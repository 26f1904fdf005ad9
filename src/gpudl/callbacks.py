"""Lightning callbacks of gpudl.

EpochCheckpoint      the best checkpoint by a monitored metric and last.ckpt, with one checkpoint
                     serialization per save (every N epochs): when the best is written, last.ckpt
                     is a hard link to (or copy of) that file.
FiniteLossGuard      stops training at the first NaN/inf training loss, before the optimizer
                     step that would spread it into the weights; the checkpoints already on
                     disk (last.ckpt and the best) stay as they are.
SampleGridCallback   for generative modules with `sample(n) -> [n, C, H, W]` in [0, 1]: a PNG
                     grid per validation epoch in <dirpath>/epoch_XXX.png, also logged to W&B.
PreemptionCheckpoint on SIGTERM/SIGINT during fit: finish the batch, save last.ckpt, raise
                     TrainingInterrupted (what a preempted cluster job or Ctrl+C gets).
RNGStateCheckpoint   random states and the training loader's shuffling state in every
                     checkpoint, restored on resume, so a resumed run repeats an uninterrupted one.

(Writing checkpoints atomically is gpudl.checkpoints.AtomicCheckpointIO, a Trainer plugin.)
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from gpudl.checks import check_int


class NonFiniteLossError(FloatingPointError):
    """Raised by FiniteLossGuard when the training loss is NaN or infinite."""


def _loss_from_outputs(outputs: Any) -> torch.Tensor | None:
    # training_step may return the loss tensor or a dict holding it under "loss".
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


class FiniteLossGuard(Callback):
    """Raise NonFiniteLossError at the first training loss that is NaN or +-inf.

    The loss is checked in `on_before_backward` (automatic optimization and every
    `manual_backward` of manual optimization, e.g. the GAN's two losses), so the step that would
    write NaN into the weights never runs; a batch that reached no backward has what
    training_step returned checked in `on_train_batch_end`. The error names the global step,
    epoch, batch and the loss value, and points at the last checkpoint written before it.
    Each check reads one boolean from the device (a host synchronization per step on a GPU).
    """

    def __init__(self) -> None:
        super().__init__()
        self._checked = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._checked = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._check(trainer, loss, "the loss passed to backward")
        self._checked = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_from_outputs(outputs)
        if loss is not None and not self._checked:  # automatic optimization: backward saw this loss
            self._check(trainer, loss, "the loss returned by training_step", batch_idx)

    def _check(self, trainer: L.Trainer, loss: torch.Tensor, what: str, batch_idx: int | None = None) -> None:
        loss = loss.detach()
        if bool(torch.isfinite(loss).all()):
            return
        value = loss.item() if loss.numel() == 1 else loss.flatten()[~torch.isfinite(loss.flatten())][0].item()
        where = f"global step {trainer.global_step}, epoch {trainer.current_epoch}"
        if batch_idx is not None:
            where += f", batch {batch_idx}"
        saved = [
            path
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint)
            for path in (cb.last_model_path, cb.best_model_path)
            if path and os.path.isfile(path)
        ]
        kept = (f"; last good checkpoint(s) kept: {', '.join(dict.fromkeys(saved))}" if saved
                else "; no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"FiniteLossGuard: training stopped, {what} is {value} at {where}. "
            f"Lower the learning rate or check the data for NaN/inf{kept}"
        )


class EpochCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the top-k by `monitor`, every `every_n_epochs` epochs) that also
    keeps `<dirpath>/<last_filename>.ckpt`, the latest state to resume from, at the same moments,
    with at most one serialization: when this save wrote a top-k file, last.ckpt becomes a hard
    link to it (a copy where links are not possible; either way atomically replaced), else last.ckpt
    is written. Without a monitor every save is a top-k file and last.ckpt links to it.

    (Two ModelCheckpoints, one for the best and one for last.ckpt, serialize the same state twice
    whenever the best improves; `save_last=True` writes last.ckpt only when the best improves.)
    """

    def __init__(self, *args: Any, last_filename: str = "last", **kwargs: Any):
        if kwargs.get("save_last"):
            raise ValueError(f"EpochCheckpoint keeps {last_filename}.ckpt itself; save_last must be false, "
                             f"got {kwargs['save_last']!r}")
        if not isinstance(last_filename, str) or not last_filename or os.sep in last_filename:
            raise ValueError(f"EpochCheckpoint: last_filename must be a file name without a folder, got "
                             f"{last_filename!r}")
        super().__init__(*args, **kwargs)
        self.last_filename = last_filename
        self._written: str | None = None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._written = filepath

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        last = os.path.join(self.dirpath, f"{self.last_filename}{self.FILE_EXTENSION}")
        self.last_model_path = last  # set first: it is part of the state saved below
        self._written = None
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self._written is None:
            self._save_checkpoint(trainer, last)
        elif trainer.is_global_zero and self._written != last:
            _link_or_copy(self._written, last)
        trainer.strategy.barrier("EpochCheckpoint.last")


def _link_or_copy(source: str, target: str) -> None:
    """Make `target` hold `source`'s bytes, atomically: a hard link (or a copy) under a temporary
    name, then os.replace; a later write of either name replaces that name only."""
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{os.getpid()}")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images [n, C, H, W] into one image [C, rows*(H+p)+p, nrow*(W+p)+p] (p = padding)."""
    if images.dim() != 4:
        raise ValueError(f"make_grid: images must be [n, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    height, width = rows * (h + padding) + padding, nrow * (w + padding) + padding
    grid = torch.full((c, height, width), pad_value, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def grid_to_uint8(grid: torch.Tensor, min_size: int = 256) -> np.ndarray:
    """[C, H, W] in [0, 1] -> uint8 [H', W'] (gray) or [H', W', 3], upscaled (nearest) so the
    short side is at least `min_size` pixels: 8x8 digits stay readable."""
    scale = max(1, math.ceil(min_size / min(grid.shape[1:])))
    grid = grid.clamp(0, 1).repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


class SampleGridCallback(Callback):
    """Save a grid of `num_samples` generated images after every `every_n_epochs`-th validation.

    The module must expose `sample(n) -> [n, C, H, W]` with values in [0, 1]. Files go to
    `dirpath` (default <trainer.default_root_dir>/samples) as epoch_XXX.png; when a WandbLogger is
    attached, the grid is also logged as the image "samples".
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 64, dirpath: str | None = None):
        super().__init__()
        self.every_n_epochs = check_int("SampleGridCallback", "every_n_epochs", every_n_epochs)
        self.num_samples = check_int("SampleGridCallback", "num_samples", num_samples)
        self.dirpath = dirpath
        self.saved: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)):
            raise TypeError(
                f"SampleGridCallback needs a module with a sample(n) method; {type(pl_module).__name__} has none "
                "(remove callbacks.sample_grid for this model)"
            )
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "samples")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._save(trainer, pl_module)

    @rank_zero_only
    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from PIL import Image  # a matplotlib dependency; torchvision is not needed

        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.sample(self.num_samples).detach().float().cpu()
        pl_module.train(was_training)
        if images.dim() != 4:
            raise ValueError(f"SampleGridCallback: sample(n) must return [n, C, H, W], got shape {tuple(images.shape)}")
        array = grid_to_uint8(make_grid(images))
        os.makedirs(self.dirpath, exist_ok=True)
        path = os.path.join(self.dirpath, f"epoch_{trainer.current_epoch:03d}.png")
        Image.fromarray(array).save(path)
        self.saved.append(path)

        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[array], step=trainer.global_step,
                                 caption=[f"epoch {trainer.current_epoch}"])


# --------------------------------------------------------------------------- resilience
class TrainingInterrupted(Exception):
    """Raised by PreemptionCheckpoint after it saved a checkpoint on SIGTERM/SIGINT."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum, self.checkpoint = signum, checkpoint
        self.exit_code = 128 + signum  # the shell's convention for "killed by signal N"
        super().__init__(f"training interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")


class PreemptionCheckpoint(Callback):
    """Save a checkpoint and stop when the process gets SIGTERM or SIGINT during fit.

    The handlers installed at the start of training only set a flag (a checkpoint written from
    inside a signal handler could catch the model halfway through an optimizer step); at the next
    training batch end (or validation end) the full training state goes to `dirpath/filename`
    (default <trainer.default_root_dir>/checkpoints/last.ckpt) and TrainingInterrupted is raised.
    Resume with ckpt_path=last (or the file). A second SIGINT while waiting stops at once
    (KeyboardInterrupt). The previous handlers come back when fit ends.
    Lightning's own SIGTERM handling only stops the loop (and is replaced here while training).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt",
                 signals: tuple[str, ...] = ("SIGTERM", "SIGINT")):
        super().__init__()
        self.dirpath, self.filename = dirpath, filename
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread install handlers
        for signum in self.signals:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._save_and_stop_if_signaled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._save_and_stop_if_signaled(trainer)

    def _save_and_stop_if_signaled(self, trainer: L.Trainer) -> None:
        if self.received is None:
            return
        signum = self.received
        dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(dirpath, self.filename)
        # The full training state (weights_only=False: optimizer, loops, callbacks), so the run resumes
        # exactly; stated, so Lightning does not log that it chose it. Every rank calls it; rank 0 writes.
        trainer.save_checkpoint(path, weights_only=False)
        self._restore()
        raise TrainingInterrupted(signum, path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


def _train_loaders(trainer: L.Trainer) -> list[Any]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    return list(loaders.values()) if isinstance(loaders, dict) else [loaders]


class RNGStateCheckpoint(Callback):
    """Make a resumed run repeat an uninterrupted one.

    Each training DataLoader's RandomSampler gets, at every epoch start, a generator seeded from
    (the loader's seed, epoch): an epoch's order depends on nothing else (not on how many epochs
    this process ran, nor on draws the DataLoader makes from its own generator when Lightning
    builds the iterator, which happens at different moments in a resumed run). torch's CPU (and
    CUDA), numpy's and Python's global random states (dropout, augmentation) are saved in every
    checkpoint and restored at the first training epoch start after a resume. Stored as tensors
    and plain types: checkpoints still load with torch.load(weights_only=True)."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            n = state["numpy"]
            np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
            p = state["python"]
            random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
        for loader in _train_loaders(trainer):
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, torch.utils.data.RandomSampler):
                own = getattr(loader, "generator", None)
                seed = own.initial_seed() if isinstance(own, torch.Generator) else torch.initial_seed()
                epoch_seed = (seed * 1_000_003 + trainer.current_epoch) % (1 << 63)
                sampler.generator = torch.Generator().manual_seed(epoch_seed)

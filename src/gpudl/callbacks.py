"""Lightning callbacks of gpudl.

FiniteLossGuard      stops training at the first NaN/inf training loss, before the optimizer
                     step that would spread it into the weights; the checkpoints already on
                     disk (ModelCheckpoint's last.ckpt and best) stay as they are.
SampleGridCallback   for generative modules with `sample(n) -> [n, C, H, W]` in [0, 1]: a PNG
                     grid per validation epoch in <dirpath>/epoch_XXX.png, also logged to W&B.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only


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
    write NaN into the weights never runs, and again in `on_train_batch_end` on what
    training_step returned. The error names the global step, epoch, batch and the loss value, and
    points at the last checkpoint written before it.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._check(trainer, loss, "the loss passed to backward")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = _loss_from_outputs(outputs)
        if loss is not None:
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
        kept = f"; last good checkpoint(s) kept: {', '.join(dict.fromkeys(saved))}" if saved else "; no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"FiniteLossGuard: training stopped, {what} is {value} at {where}. "
            f"Lower the learning rate or check the data for NaN/inf{kept}"
        )


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images [n, C, H, W] into one image [C, rows*(H+p)+p, nrow*(W+p)+p] (p = padding)."""
    if images.dim() != 4:
        raise ValueError(f"make_grid: images must be [n, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=images.dtype)
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
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"SampleGridCallback: every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"SampleGridCallback: num_samples must be an int >= 1, got {num_samples!r}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
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
                logger.log_image(key="samples", images=[array], step=trainer.global_step, caption=[f"epoch {trainer.current_epoch}"])

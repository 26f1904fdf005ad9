"""What the supervised modules share: the checks every one of them needs (optimizer and scheduler
factories; num_classes >= 2 for classifiers), optimizer/scheduler construction from Hydra
partials, and the train/val/test steps with their metrics.

A model file checks its own hyperparameters with `gpudl.checks`, builds its layers, says
`forward`, and picks a base: `RegressionModule` (MSE, logs mse and r2 over the whole split) or
`ClassificationModule` (logs acc, acc_best).

Per training step nothing waits for the device and Lightning's `self.log` runs only on logging
steps: the training loss is summed on the device and logged once per epoch (its step value every
`trainer.log_every_n_steps`), and a classifier counts correct predictions in device tensors that
are read once per epoch.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
from torchmetrics import MaxMetric, MeanSquaredError, R2Score

from gpudl import ops
from gpudl.checks import check_factory, check_int


def build_optimizer(params, optimizer: Callable | None, scheduler: Callable | None, default_lr: float,
                    monitor: str = "val/loss") -> dict:
    """Call the optimizer partial on `params` (Adam at `default_lr` when None) and the scheduler
    partial on the optimizer. Returns Lightning's optimizer config dict."""
    opt = torch.optim.Adam(params, lr=default_lr) if optimizer is None else optimizer(params=params)
    config: dict = {"optimizer": opt}
    if scheduler is not None:
        # `monitor` serves ReduceLROnPlateau; every scheduler steps once per epoch.
        config["lr_scheduler"] = {"scheduler": scheduler(optimizer=opt), "monitor": monitor, "interval": "epoch"}
    return config


# --------------------------------------------------------------------------- supervised bases
class SupervisedModule(L.LightningModule):
    """Steps shared by the supervised models. A subclass defines `forward(x)` and `loss(out, y)`,
    and may update metrics in `_update_metrics(stage, out, y)`."""

    default_lr = 1e-3  # Adam's learning rate when no optimizer partial is given

    def __init__(self, optimizer: Callable | None = None, scheduler: Callable | None = None):
        super().__init__()
        check_factory(type(self).__name__, "optimizer", optimizer)
        check_factory(type(self).__name__, "scheduler", scheduler)
        # Kept out of the hyperparameters: partials are not plain types a checkpoint can hold.
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.optimizer_factory, self.scheduler_factory, self.default_lr)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _update_metrics(self, stage: str, out: torch.Tensor, y: torch.Tensor) -> None:
        pass

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        if stage == "train":
            self._log_train_loss(loss, x.shape[0])
        else:
            # batch_size makes the epoch value a per-sample mean even when the last batch is short;
            # sync_dist: the mean over every process's batches under DDP.
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0],
                     sync_dist=True)
        self._update_metrics(stage, out.detach(), y)
        return loss

    def _log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """train/loss_step on the steps the loggers write (every trainer.log_every_n_steps) and the
        epoch's last; train/loss_epoch (and train/loss) = the epoch's per-sample mean, summed on the
        device and logged once, at the epoch's last batch. (Lightning's self.log costs Python time
        on every call; this calls it on a few steps only.)"""
        total, seen = getattr(self, "_train_loss_sum", None), getattr(self, "_train_seen", 0)
        weighted = loss.detach() * batch_size
        self._train_loss_sum, self._train_seen = weighted if total is None else total + weighted, seen + batch_size
        trainer = self._trainer
        last = trainer is None or bool(trainer.is_last_batch)
        if last or (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        if last:
            mean = self._train_loss_sum / self._train_seen
            self._train_loss_sum, self._train_seen = None, 0
            self.log("train/loss_epoch", mean, on_step=False, on_epoch=True, batch_size=1)
            self.log("train/loss", mean, on_step=False, on_epoch=True, batch_size=1, logger=False)

    def on_train_epoch_start(self):
        self._train_loss_sum, self._train_seen = None, 0  # a resumed epoch starts afresh

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")


class RegressionModule(SupervisedModule):
    """MSE regression with one output [N, 1]; logs {val,test}/mse and /r2 computed over the whole
    split (accumulated sums, not per-batch averages)."""

    def __init__(self, optimizer=None, scheduler=None):
        super().__init__(optimizer, scheduler)
        self.val_mse, self.test_mse = MeanSquaredError(), MeanSquaredError()
        self.val_r2, self.test_r2 = R2Score(), R2Score()

    def loss(self, out, y):
        return ops.mse_loss(out, y)

    def _update_metrics(self, stage, out, y):
        if stage == "train":
            return
        mse, r2 = getattr(self, f"{stage}_mse"), getattr(self, f"{stage}_r2")
        mse.update(out.reshape(-1), y.reshape(-1))
        r2.update(out.reshape(-1), y.reshape(-1))
        self.log(f"{stage}/mse", mse, on_step=False, on_epoch=True)
        self.log(f"{stage}/r2", r2, on_step=False, on_epoch=True, prog_bar=True)


class ClassificationModule(SupervisedModule):
    """Classifier base: logs train/acc, val/acc, val/acc_best (running max over validation
    epochs), test/acc. A subclass defines `predict_labels(out) -> int labels [N]`.

    Accuracy is exact over the split: correct predictions and samples are summed on the device
    during the epoch (and over every process under DDP) and divided once at the epoch's end."""

    def __init__(self, num_classes: int, optimizer=None, scheduler=None):
        super().__init__(optimizer, scheduler)
        self.num_classes = check_int(type(self).__name__, "num_classes", num_classes, minimum=2)
        # stage -> (correct predictions: a device tensor, samples seen: a Python int)
        self._counts: dict[str, tuple[torch.Tensor, int]] = {}
        self.val_acc_best = MaxMetric()

    def predict_labels(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _update_metrics(self, stage, out, y):
        hits = (self.predict_labels(out) == y.reshape(-1).long()).sum()
        correct, seen = self._counts.get(stage, (0, 0))
        self._counts[stage] = (hits + correct, seen + y.shape[0])

    def _log_accuracy(self, stage: str) -> torch.Tensor | None:
        """Log <stage>/acc from the epoch's counts (summed over processes) and reset them."""
        if stage not in self._counts:
            return None
        correct, seen = self._counts.pop(stage)
        counts = torch.stack([correct.double(), torch.full_like(correct, seen, dtype=torch.float64)])
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        acc = (counts[0] / counts[1]).float()
        # The value is the same on every process; sync_dist only keeps Lightning's DDP warning away.
        self.log(f"{stage}/acc", acc, prog_bar=stage != "train", sync_dist=True)
        return acc

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._counts.pop("train", None)

    def on_train_epoch_end(self):
        self._log_accuracy("train")

    def on_validation_epoch_start(self):
        self._counts.pop("val", None)

    def on_test_epoch_start(self):
        self._counts.pop("test", None)

    def on_test_epoch_end(self):
        self._log_accuracy("test")

    def on_train_start(self):
        # The sanity-check validation ran on untrained weights: forget its accuracy (not when
        # resuming: the best so far came back from the checkpoint).
        if self.trainer.global_step == 0:
            self.val_acc_best.reset()

    # torchmetrics states are not in the state_dict: carry the running best through checkpoints.
    def on_save_checkpoint(self, checkpoint):
        if self.val_acc_best.update_count:
            checkpoint["val_acc_best"] = float(self.val_acc_best.compute())

    def on_load_checkpoint(self, checkpoint):
        if "val_acc_best" in checkpoint:
            self.val_acc_best.reset()
            self.val_acc_best.update(torch.tensor(checkpoint["val_acc_best"]))

    def on_validation_epoch_end(self):
        acc = self._log_accuracy("val")
        if self.trainer.sanity_checking or acc is None:
            return
        self.val_acc_best.update(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

"""FiniteLossGuard stops training at the first NaN/inf loss and leaves the last good checkpoint;
SampleGridCallback writes its PNG grids."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from gpudl.callbacks import FiniteLossGuard, NonFiniteLossError, SampleGridCallback, grid_to_uint8, make_grid


def fake_trainer(step=7, epoch=2):
    return SimpleNamespace(global_step=step, current_epoch=epoch, checkpoint_callbacks=[])


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_guard_raises_on_non_finite_loss(value, shown):
    guard = FiniteLossGuard()
    with pytest.raises(NonFiniteLossError) as info:
        guard.on_before_backward(fake_trainer(), None, torch.tensor(value))
    message = str(info.value)
    assert f"is {shown} at global step 7, epoch 2" in message
    assert "no checkpoint had been saved yet" in message
    with pytest.raises(NonFiniteLossError, match="returned by training_step is nan at global step 7, epoch 2, batch 3"):
        guard.on_train_batch_end(fake_trainer(), None, {"loss": torch.tensor(float("nan"))}, None, 3)


def test_guard_passes_finite_losses_and_other_outputs():
    guard = FiniteLossGuard()
    guard.on_before_backward(fake_trainer(), None, torch.tensor(1.5, requires_grad=True))
    guard.on_train_batch_end(fake_trainer(), None, torch.tensor(0.0), None, 0)
    guard.on_train_batch_end(fake_trainer(), None, None, None, 0)  # manual optimization may return nothing


def test_diverging_run_stops_and_keeps_a_loadable_checkpoint(tmp_path):
    """Plain gradient descent with a huge step size on the diabetes data: the weights grow by a
    factor ~1e6 per step until the loss overflows to inf (epoch 3). One step per epoch, so
    last.ckpt holds the finite weights of the previous epoch."""
    pytest.importorskip("hydra", reason="needs hydra-core (the GPU check machine has none)")
    from gpudl.train import train
    from gpudl.utils import compose

    out = tmp_path / "run"
    cfg = compose(["experiment=linreg_diabetes", "optimizer=gd", "model.optimizer.lr=1e6", "logger=none",
                   "trainer.enable_progress_bar=false"], output_dir=out)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "FiniteLossGuard: training stopped" in message and "global step 3, epoch 3" in message
    last = out / "checkpoints" / "last.ckpt"
    assert str(last) in message
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    report = json.loads((out / "metrics.json").read_text())  # the failure is recorded, for sweeps
    assert report["status"] == "failed" and report["error_type"] == "NonFiniteLossError" and report["metrics"] == {}


# --------------------------------------------------------------------------- sample grids
def test_make_grid_layout():
    images = torch.rand(10, 1, 8, 8)
    grid = make_grid(images, padding=1)
    assert grid.shape == (1, 3 * 9 + 1, 4 * 9 + 1)  # ceil(sqrt(10)) = 4 per row, 3 rows
    assert torch.equal(grid[:, 1:9, 1:9], images[0])
    array = grid_to_uint8(grid, min_size=100)
    assert array.dtype.name == "uint8" and array.ndim == 2 and min(array.shape) >= 100
    with pytest.raises(ValueError, match=r"images must be \[n, C, H, W\]"):
        make_grid(torch.rand(8, 8))


class TinyGenerator(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def sample(self, n):
        return torch.rand(n, 1, 8, 8) * self.scale

    def training_step(self, batch, batch_idx):
        return (self.scale - batch[0].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sample_grid_callback_writes_one_png_per_validation_epoch(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.rand(4, 1)), batch_size=2)
    callback = SampleGridCallback(every_n_epochs=2, num_samples=9)
    trainer = L.Trainer(max_epochs=4, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(TinyGenerator(), train_dataloaders=data, val_dataloaders=data)
    assert sorted(p.name for p in Path(tmp_path, "samples").iterdir()) == ["epoch_001.png", "epoch_003.png"]


def test_sample_grid_callback_needs_a_sampler(tmp_path):
    with pytest.raises(TypeError, match="needs a module with a sample\\(n\\) method"):
        SampleGridCallback().setup(SimpleNamespace(default_root_dir=str(tmp_path)), L.LightningModule(), "fit")
    with pytest.raises(ValueError, match="every_n_epochs must be an int >= 1"):
        SampleGridCallback(every_n_epochs=0)

"""Mixed precision and torch.compile in whole training runs: every experiment trains a few steps
through train() with precision=bf16-mixed, and with compile.enabled=true (aot_eager here, which
traces forward and backward exactly as Inductor would see them without generating code); and
each model trains a few steps on the Triton kernels under autocast (float16: the interpreter's
bfloat16 arithmetic is not faithful), its losses tracking the torch backend's."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

import gpudl  # noqa: E402
from gpudl import ops  # noqa: E402
from gpudl.models import (  # noqa: E402,E501
    AttentionModule,
    CNNModule,
    GANModule,
    LinearRegressionModule,
    LogisticRegressionModule,
    RNNModule,
)
from gpudl.train import train  # noqa: E402
from gpudl.utils import compose  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))
FAST = ["logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "model.judge_epochs=1", "model.num_eval_samples=50", "callbacks.sample_grid.num_samples=16"]


def _run(tmp_path, experiment, *overrides):
    extra = [o for o in FAST if not o.startswith(("model.judge", "model.num_eval", "callbacks.sample"))]
    if experiment.startswith(("gan", "dcgan")):
        extra = FAST
    return train(compose([f"experiment={experiment}", *extra, *overrides], output_dir=tmp_path / "run"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_in_bf16_mixed(experiment, tmp_path):
    metrics = _run(tmp_path, experiment, "precision=bf16-mixed")
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_compiled(experiment, tmp_path):
    metrics = _run(tmp_path, experiment, "compile.enabled=true", "compile.backend=aot_eager")
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])


ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def _classifier(n):
    return torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,))


MODELS = {
    "linear_regression": (lambda: LinearRegressionModule(10, ADAM), lambda n: (torch.randn(n, 10), torch.randn(n, 1))),
    "logistic_regression": (lambda: LogisticRegressionModule(30, ADAM),
                            lambda n: (torch.randn(n, 30), torch.randint(0, 2, (n, 1)).float())),
    "cnn": (lambda: CNNModule(optimizer=ADAM), _classifier),
    "rnn": (lambda: RNNModule(hidden_size=16, optimizer=ADAM), _classifier),
    "attention": (lambda: AttentionModule(embed_dim=16, num_heads=2, num_layers=1, mlp_dim=32, optimizer=ADAM),
                  _classifier),
}


def _losses(make_model, make_batch, backend, steps=2):
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    with gpudl.use_backend(backend):
        for _ in range(steps):
            x, y = make_batch(16)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_models_train_on_the_kernels_under_autocast(name):
    make_model, make_batch = MODELS[name]
    ours, theirs = _losses(make_model, make_batch, "triton"), _losses(make_model, make_batch, "torch")
    assert all(math.isfinite(v) for v in ours)
    assert ours == pytest.approx(theirs, rel=2e-2, abs=2e-3)


def test_gan_trains_on_the_kernels_under_autocast():
    def losses(backend):
        torch.manual_seed(0)
        model = GANModule(image_shape=(1, 8, 8), latent_dim=8, hidden=32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        out = []
        with gpudl.use_backend(backend):
            for _ in range(3):
                real, z = torch.rand(16, 1, 8, 8), torch.randn(16, 8)
                with torch.autocast("cpu", dtype=torch.float16):
                    fake = model.generator(z)
                    loss = ops.gan_discriminator_loss(model.discriminator(real), model.discriminator(fake.detach()))
                    loss = loss + ops.gan_generator_loss(model.discriminator(fake))
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(loss.item())
        return out

    assert losses("triton") == pytest.approx(losses("torch"), rel=2e-2, abs=2e-3)


def test_trainer_gpu_defaults_to_mixed_precision(monkeypatch):
    import gpudl.config  # registers the resolver

    assert compose(["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert compose(["trainer=gpu", "precision=32-true"]).trainer.precision == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert gpudl.config.mixed_precision() == "16-mixed"  # a GPU without bfloat16

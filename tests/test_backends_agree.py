"""Every model computes the same loss and parameter gradients on the Triton kernels as on the
PyTorch reference, from the same seed and the same real batch (kernels interpreted on the CPU)."""

import pytest
import torch

import gpudl
from gpudl import ops
from gpudl.data import BreastCancerDataModule, DiabetesDataModule, DigitsDataModule
from gpudl.kernels import REGISTRY
from gpudl.models import (
    AttentionModule,
    CNNModule,
    GANModule,
    LinearRegressionModule,
    LogisticRegressionModule,
    RNNModule,
)


def _batch(datamodule, size=16):
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    return x[:size], y[:size]


def _supervised_loss(module, batch):
    x, y = batch
    return module.loss(module(x), y)


def _gan_losses(module, batch):
    real, _ = batch
    z = torch.randn(real.shape[0], module.hparams.latent_dim, generator=torch.Generator().manual_seed(1))
    fake = module.generator(z)
    d_loss = ops.gan_discriminator_loss(module.discriminator(real), module.discriminator(fake.detach()))
    g_loss = ops.gan_generator_loss(module.discriminator(fake))
    return d_loss + g_loss


MODELS = {
    "linear_regression": (lambda: LinearRegressionModule(num_features=10), lambda: DiabetesDataModule(batch_size=16), _supervised_loss),
    "logistic_regression": (lambda: LogisticRegressionModule(num_features=30), lambda: BreastCancerDataModule(batch_size=16), _supervised_loss),
    "cnn": (lambda: CNNModule(channels=(16, 32), hidden=32), lambda: DigitsDataModule(batch_size=16), _supervised_loss),
    "rnn": (lambda: RNNModule(hidden_size=32), lambda: DigitsDataModule(batch_size=16), _supervised_loss),
    "attention": (lambda: AttentionModule(embed_dim=32, num_heads=2, num_layers=1, mlp_dim=32), lambda: DigitsDataModule(batch_size=16), _supervised_loss),
    "gan": (lambda: GANModule(latent_dim=16, hidden=32), lambda: DigitsDataModule(batch_size=16), _gan_losses),
}


def _loss_and_grads(name, backend_name):
    make_model, make_data, loss_fn = MODELS[name]
    torch.manual_seed(0)
    module = make_model()
    batch = _batch(make_data())
    with gpudl.use_backend(backend_name):
        loss = loss_fn(module, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_step_agrees_between_backends(name):
    loss_torch, grads_torch = _loss_and_grads(name, "torch")
    loss_triton, grads_triton = _loss_and_grads(name, "triton")
    torch.testing.assert_close(loss_triton, loss_torch, atol=1e-5, rtol=1e-4)
    assert grads_triton.keys() == grads_torch.keys()
    assert grads_torch, "the model produced no gradients"
    for key, g in grads_torch.items():
        torch.testing.assert_close(grads_triton[key], g, atol=1e-5 * max(1.0, g.abs().max().item()), rtol=1e-3,
                                   msg=lambda m, key=key: f"{name} gradient of {key}: {m}")


def test_models_reach_the_kernels_they_are_meant_to():
    """Under backend 'triton', each op a model calls is one with a registered kernel."""
    expected = {"conv2d", "max_pool2d", "linear", "scaled_dot_product_attention", "rnn", "cross_entropy",
                "mse_loss", "binary_cross_entropy_with_logits", "gan_discriminator_loss", "gan_generator_loss",
                "layer_norm"}
    assert expected <= set(REGISTRY), f"ops without a kernel: {sorted(expected - set(REGISTRY))}"


# Two optimizer steps, one validation and one test batch of every experiment, through train();
# batches of 4 keep the interpreted kernels' grids small.
FAST = ["data.batch_size=4", "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks=none"]
GAN_FAST = ["model.judge_epochs=1", "model.num_eval_samples=50"]
EXPERIMENTS = ["linreg_diabetes", "linreg_toy", "logreg_cancer", "cnn_digits", "cnn_mnist", "rnn_digits",
               "attention_digits", "gan_digits", "gan_mnist"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_end_to_end_on_the_kernels(experiment, tmp_path):
    """kernels.backend=triton (interpreted here) trains and tests with the losses of kernels.backend=torch."""
    from gpudl.train import train
    from gpudl.utils import compose

    extra = GAN_FAST if experiment.startswith("gan") else []
    results = {}
    for name in ("torch", "triton"):
        cfg = compose([*FAST, *extra, f"experiment={experiment}", f"kernels.backend={name}"], output_dir=tmp_path / name)
        results[name] = train(cfg)
    for key in ("train/loss", "test/loss"):
        assert key in results["triton"], key
        torch.testing.assert_close(results["triton"][key], results["torch"][key], atol=1e-4, rtol=1e-3,
                                   msg=lambda m, key=key: f"{experiment} {key}: {m}")

"""Every model computes the same loss and parameter gradients on the Triton kernels as on the
PyTorch reference, from the same seed and the same real batch (kernels interpreted on the CPU,
compiled on a GPU); each model's ops are spied on as they are dispatched, so the test knows that
under `triton` every op it calls reached its kernel, and that `torch` launched none."""

import sys

import pytest
import torch
from helpers import assert_close

import gpudl
from gpudl import backend, ops
from gpudl.data import BreastCancerDataModule, DiabetesDataModule, DigitsDataModule, TextDataModule
from gpudl.kernels import REGISTRY
from gpudl.models import (
    AttentionModule,
    CNNModule,
    GANModule,
    GPTModule,
    LinearRegressionModule,
    LogisticRegressionModule,
    RNNModule,
)


def _batch(datamodule, device, size=16):
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    return x[:size].to(device), y[:size].to(device)


def _supervised_loss(module, batch):
    x, y = batch
    return module.loss(module(x), y)


def _gan_losses(module, batch):
    real, _ = batch
    z = torch.randn(real.shape[0], module.hparams.latent_dim, generator=torch.Generator().manual_seed(1))
    fake = module.generator(z.to(real.device))
    d_loss = ops.gan_discriminator_loss(module.discriminator(real), module.discriminator(fake.detach()))
    g_loss = ops.gan_generator_loss(module.discriminator(fake))
    return d_loss + g_loss


MODELS = {
    "linear_regression": (lambda: LinearRegressionModule(num_features=10), lambda: DiabetesDataModule(batch_size=16),
                          _supervised_loss),
    "logistic_regression": (lambda: LogisticRegressionModule(num_features=30),
                            lambda: BreastCancerDataModule(batch_size=16), _supervised_loss),
    "cnn": (lambda: CNNModule(channels=(16, 32), hidden=32), lambda: DigitsDataModule(batch_size=16), _supervised_loss),
    "rnn": (lambda: RNNModule(hidden_size=32), lambda: DigitsDataModule(batch_size=16), _supervised_loss),
    "attention": (lambda: AttentionModule(embed_dim=32, num_heads=2, num_layers=1, mlp_dim=32),
                  lambda: DigitsDataModule(batch_size=16), _supervised_loss),
    "gan": (lambda: GANModule(latent_dim=16, hidden=32), lambda: DigitsDataModule(batch_size=16), _gan_losses),
    "dcgan": (lambda: GANModule(latent_dim=16, architecture="dcgan", channels=8),
              lambda: DigitsDataModule(batch_size=16), _gan_losses),
    "gpt": (lambda: GPTModule(context_length=16, d_model=32, num_heads=2, num_layers=1),
            lambda: TextDataModule(context_length=16, batch_size=4, samples_per_epoch=16), _supervised_loss),
}

# The gpudl.ops each model calls in one training step (forward and loss). The spy below checks that
# each is dispatched, and nothing else: a model that stops reaching one of its kernels fails here.
MODEL_OPS = {
    "linear_regression": {"linear", "mse_loss"},
    "logistic_regression": {"linear", "binary_cross_entropy_with_logits"},
    "cnn": {"conv2d", "max_pool2d", "linear", "cross_entropy"},
    "rnn": {"rnn", "linear", "cross_entropy"},
    "attention": {"linear", "layer_norm", "scaled_dot_product_attention", "cross_entropy"},
    "gan": {"linear", "gan_discriminator_loss", "gan_generator_loss"},
    "dcgan": {"conv2d", "conv_transpose2d", "gan_discriminator_loss", "gan_generator_loss"},
    "gpt": {"linear", "layer_norm", "scaled_dot_product_attention", "cross_entropy"},
}


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    """Exact fp32 products on both backends (on a GPU conv2d would otherwise run on TF32 tensor
    cores in both, each rounding differently)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def dispatched(monkeypatch):
    """[(op, backend chosen)] of every gpudl.ops call, in order (a spy on backend.resolve)."""
    calls = []
    resolve = backend.resolve

    def spy(op, tensors, *measure):  # measure: the call's args and candidates, for auto on a GPU
        chosen = resolve(op, tensors, *measure)
        calls.append((op, chosen))
        return chosen

    monkeypatch.setattr(backend, "resolve", spy)
    return calls


def _loss_and_grads(name, backend_name, device):
    make_model, make_data, loss_fn = MODELS[name]
    torch.manual_seed(0)
    module = make_model().to(device)
    batch = _batch(make_data(), device)
    with gpudl.use_backend(backend_name):
        loss = loss_fn(module, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _kernel_modules(op):
    """The modules defining the @triton.jit kernels the op's entry module names (its family's
    X_triton.py, or a sibling family's: conv_transpose2d launches conv2d's kernels)."""
    entry = sys.modules[REGISTRY[op].triton.__module__]
    found = set()
    for value in vars(entry).values():
        if hasattr(value, "fn") and hasattr(value, "__getitem__"):  # kernel[grid]: jit, interpreted or autotuned
            while hasattr(value, "fn"):
                value = value.fn
            found.add(value.__module__)
    return found or {entry.__name__}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_step_agrees_between_backends(name, device, dispatched, launches):
    loss_torch, grads_torch = _loss_and_grads(name, "torch", device)
    assert {op for op, _ in dispatched} == MODEL_OPS[name], f"{name} dispatched {sorted({op for op, _ in dispatched})}"
    assert {chosen for _, chosen in dispatched} == {"torch"} and len(launches) == 0, "backend torch ran a kernel"
    dispatched.clear()

    loss_triton, grads_triton = _loss_and_grads(name, "triton", device)
    assert {op for op, _ in dispatched} == MODEL_OPS[name], f"{name} dispatched {sorted({op for op, _ in dispatched})}"
    assert {chosen for _, chosen in dispatched} == {"triton"}
    missing = {op for op in MODEL_OPS[name] if not _kernel_modules(op) & launches.modules()}
    assert not missing, f"{name}: no kernel of {sorted(missing)} launched under backend triton"

    torch.testing.assert_close(loss_triton, loss_torch, atol=1e-5, rtol=1e-5)
    assert grads_torch, "the model produced no gradients"
    assert grads_triton.keys() == grads_torch.keys()
    for key, g in grads_torch.items():
        # Through a whole model the fp32 roundings of both backends add up: atol 1e-4 of the RMS.
        assert_close(f"{name} gradient of {key}", grads_triton[key], g, atol=1e-4, rtol=1e-4)


# Two optimizer steps, one validation and one test batch of every experiment, through train();
# batches of 4 keep the interpreted kernels' grids small.
FAST = ["data.batch_size=4", "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks=none"]
GAN_FAST = ["model.judge_epochs=1", "model.num_eval_samples=50"]
# The interpreter runs a convolution program by program: the DCGAN on 28x28 MNIST took 5 minutes
# here (its transposed convolutions mostly). On the 8x8 digits, narrower, the same code paths run.
DCGAN_FAST = ["data=digits", "model.image_shape=[1,8,8]", "model.generator.channels=4",
              "model.discriminator.channels=4", "data.batch_size=8", "model.num_eval_samples=16"]
GPT_FAST = ["data.batch_size=8", "data.context_length=32", "model.context_length=32"]
# Each experiment's data, image size and architecture, narrower: the interpreter runs a grid's
# programs one by one, so width costs time (cnn_mnist at its 32/64 channels: about 9x cnn_digits'
# time) while it adds programs, not code paths; every kernel's shapes, ragged ones included, are
# the registry harness's (tests/test_kernels.py). Kept: head dims (attention 16, GPT 24, ragged).
NARROW = {
    "cnn_mnist": ["model.channels=[4,8]", "model.hidden=16", "data.batch_size=2"],  # 28x28: programs ~ pixels
    "attention_digits": ["model.embed_dim=32", "model.num_heads=2", "model.mlp_dim=64", "model.num_layers=1"],
    "gan_digits": ["model.generator.hidden=32", "model.discriminator.hidden=32", "model.judge_hidden=32"],
    "gan_mnist": ["model.generator.hidden=32", "model.discriminator.hidden=32", "model.judge_hidden=32"],
    "gpt_chars": ["model.d_model=48", "model.num_heads=2", "model.num_layers=1"],
}
EXPERIMENTS = ["linreg_diabetes", "linreg_toy", "logreg_cancer", "cnn_digits", "cnn_mnist", "rnn_digits",
               "attention_digits", "gan_digits", "gan_mnist", "dcgan_mnist", "gpt_chars"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains_end_to_end_on_the_kernels(experiment, tmp_path, device, launches):
    """kernels.backend=triton (interpreted on the CPU) trains and tests with the losses of
    kernels.backend=torch; the triton run launched kernels, the torch run none."""
    pytest.importorskip("hydra")
    from gpudl.train import train
    from gpudl.utils import compose

    extra = list(GAN_FAST) if "gan" in experiment else []  # a copy: the += below must not grow GAN_FAST
    extra += DCGAN_FAST if experiment == "dcgan_mnist" else GPT_FAST if experiment == "gpt_chars" else []
    extra += NARROW.get(experiment, [])
    trainer = "trainer=gpu" if device.type == "cuda" else "trainer=cpu"
    results, counts = {}, {}
    for name in ("torch", "triton"):
        before = len(launches)
        cfg = compose([*FAST, *extra, f"experiment={experiment}", trainer, f"kernels.backend={name}"],
                      output_dir=tmp_path / name)
        results[name] = train(cfg)
        counts[name] = len(launches) - before
    assert counts["torch"] == 0, f"kernels.backend=torch launched {counts['torch']} Triton kernels"
    assert counts["triton"] > 0, "kernels.backend=triton launched no Triton kernel"
    for key in ("train/loss", "test/loss"):
        assert key in results["triton"], key
        torch.testing.assert_close(results["triton"][key], results["torch"][key], atol=1e-4, rtol=1e-3,
                                   msg=lambda m, key=key: f"{experiment} {key}: {m}")

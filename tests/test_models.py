"""gpudl.models: shapes, one training step each, hyperparameter validation, optimizer/scheduler
partials, checkpoints with plain hyperparameters, the GAN's manual optimization and its judge;
plus one slow test per model that trains to its target (pytest -m slow)."""

from __future__ import annotations

import functools
import logging
import warnings

import lightning as L
import pytest
import torch

import gpudl
from gpudl.data import BreastCancerDataModule, DiabetesDataModule, DigitsDataModule, ToyLineDataModule
from gpudl.models import (
    AttentionModule,
    CNNModule,
    GANModule,
    LinearRegressionModule,
    LogisticRegressionModule,
    RNNModule,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", deterministic=True, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**defaults, **kwargs})


def _digits(batch_size=32):
    return DigitsDataModule(batch_size=batch_size)


# --------------------------------------------------------------------------- forward / backward shapes
@pytest.mark.parametrize(
    "make, x, out_shape",
    [
        (lambda: LinearRegressionModule(10, ADAM), torch.randn(5, 10), (5, 1)),
        (lambda: LogisticRegressionModule(30, ADAM), torch.randn(5, 30), (5, 1)),
        (lambda: CNNModule(optimizer=ADAM), torch.rand(5, 1, 8, 8), (5, 10)),
        (lambda: CNNModule(image_size=28, channels=[8, 16], optimizer=ADAM), torch.rand(3, 1, 28, 28), (3, 10)),
        (lambda: RNNModule(optimizer=ADAM), torch.rand(5, 1, 8, 8), (5, 10)),
        (lambda: RNNModule(input_size=28, num_layers=2, hidden_size=16, optimizer=ADAM), torch.rand(2, 1, 28, 28),
         (2, 10)),
        (lambda: AttentionModule(optimizer=ADAM), torch.rand(5, 1, 8, 8), (5, 10)),
        (lambda: AttentionModule(patch_size=2, pool="mean", optimizer=ADAM), torch.rand(5, 1, 8, 8), (5, 10)),
        (lambda: AttentionModule(image_size=28, patch_size=7, embed_dim=32, optimizer=ADAM), torch.rand(2, 1, 28, 28),
         (2, 10)),
    ],
)
def test_forward_backward_shapes(make, x, out_shape):
    model = make()
    out = model(x)
    assert out.shape == out_shape
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_rnn_reads_rows_as_time_steps():
    model = RNNModule(input_size=8, hidden_size=4, optimizer=ADAM)
    images = torch.rand(3, 1, 8, 8)
    # Rows of the image are the sequence: same logits as feeding [N, 8 rows, 8 pixels] directly.
    torch.testing.assert_close(model(images), model(images[:, 0]))


def test_attention_patches_cover_the_image_in_raster_order():
    model = AttentionModule(image_size=4, patch_size=2, embed_dim=8, num_heads=2, optimizer=ADAM)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tokens = model.tokens(x)
    assert tokens.shape == (1, 4, 4)
    assert tokens[0, 0].tolist() == [0.0, 1.0, 4.0, 5.0] and tokens[0, 3].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        CNNModule(optimizer=ADAM)(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="input_size"):
        RNNModule(optimizer=ADAM)(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        AttentionModule(optimizer=ADAM)(torch.rand(2, 8, 8))


# --------------------------------------------------------------------------- hyperparameter validation
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LinearRegressionModule(0, ADAM), "num_features"),
        (lambda: LogisticRegressionModule(-3, ADAM), "num_features"),
        (lambda: LinearRegressionModule(3, optimizer="adam"), "optimizer must be a callable"),
        (lambda: CNNModule(channels=(32, 0), optimizer=ADAM), "channels"),
        (lambda: CNNModule(channels=(), optimizer=ADAM), "channels"),
        (lambda: CNNModule(hidden=0, optimizer=ADAM), "hidden"),
        (lambda: CNNModule(dropout=1.0, optimizer=ADAM), "dropout"),
        (lambda: CNNModule(num_classes=1, optimizer=ADAM), "num_classes"),
        (lambda: CNNModule(image_size=4, channels=(8, 8, 8), optimizer=ADAM), "image_size 4 is too small"),
        (lambda: RNNModule(hidden_size=0, optimizer=ADAM), "hidden_size"),
        (lambda: RNNModule(num_layers=0, optimizer=ADAM), "num_layers"),
        (lambda: AttentionModule(embed_dim=30, num_heads=4, optimizer=ADAM), "num_heads 4 must divide embed_dim 30"),
        (lambda: AttentionModule(patch_size=3, optimizer=ADAM), "patch_size 3 must divide image_size 8"),
        (lambda: AttentionModule(pool="max", optimizer=ADAM), "pool"),
        (lambda: AttentionModule(mlp_dim=-1, optimizer=ADAM), "mlp_dim"),
        (lambda: GANModule(image_shape=(1, 8), optimizer=ADAM), "image_shape"),
        (lambda: GANModule(latent_dim=0, optimizer=ADAM), "latent_dim"),
        (lambda: GANModule(num_eval_samples=0, optimizer=ADAM), "num_eval_samples"),
        (lambda: GANModule(gradient_clip_val=-1.0, optimizer=ADAM), "gradient_clip_val"),
        (lambda: GANModule(judge_epochs=0, optimizer=ADAM), "judge_epochs"),
        (lambda: GANModule(architecture="resnet", optimizer=ADAM), "architecture must be one of"),
        (lambda: GANModule(architecture="dcgan", image_shape=(1, 10, 10)), r"side divisible by 4.*\(1, 10, 10\)"),
        (lambda: GANModule(architecture="dcgan", image_shape=(1, 8, 12)), "square images"),
        (lambda: GANModule(architecture="dcgan", channels=0), "channels"),
    ],
)
def test_hyperparameters_are_validated(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# --------------------------------------------------------------------------- optimizer / scheduler partials
def test_optimizer_and_scheduler_partials_are_used():
    sgd = functools.partial(torch.optim.SGD, lr=0.3, momentum=0.0)
    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    config = LinearRegressionModule(3, sgd, step).configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].param_groups[0]["lr"] == 0.3
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["monitor"] == "val/loss"
    # No partial: the module's tuned default (Adam).
    assert isinstance(CNNModule().configure_optimizers()["optimizer"], torch.optim.Adam)


def test_gan_optimizers_one_per_net():
    gan = GANModule(optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
                    d_optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    opt_g, opt_d = gan.configure_optimizers()
    assert isinstance(opt_g, torch.optim.Adam) and isinstance(opt_d, torch.optim.SGD)
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == {id(p) for p in gan.generator.parameters()}
    assert {id(p) for g in opt_d.param_groups for p in g["params"]} == {id(p) for p in gan.discriminator.parameters()}
    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    optimizers, schedulers = GANModule(scheduler=step).configure_optimizers()
    assert len(optimizers) == len(schedulers) == 2


# --------------------------------------------------------------------------- one short fit each
@pytest.mark.parametrize(
    "make_dm, make_model, metrics",
    [
        (lambda: DiabetesDataModule(batch_size=64), lambda: LinearRegressionModule(10, ADAM),
         ["val/loss", "val/mse", "val/r2"]),
        (lambda: ToyLineDataModule(batch_size=None), lambda: LinearRegressionModule(1, ADAM),
         ["val/r2", "test/slope", "test/intercept"]),
        (lambda: BreastCancerDataModule(), lambda: LogisticRegressionModule(30, ADAM),
         ["val/acc", "val/acc_best", "test/acc"]),
        (lambda: _digits(), lambda: CNNModule(channels=(4, 8), hidden=16, dropout=0.1, optimizer=ADAM),
         ["val/acc_best", "test/acc"]),
        (lambda: _digits(), lambda: RNNModule(hidden_size=16, optimizer=ADAM), ["val/acc_best", "test/acc"]),
        (lambda: _digits(),
         lambda: AttentionModule(embed_dim=16, num_heads=2, num_layers=1, mlp_dim=32, optimizer=ADAM),
         ["val/acc_best", "test/acc"]),
    ],
)
def test_short_fit_logs_the_metrics(tmp_path, make_dm, make_model, metrics):
    dm, model = make_dm(), make_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logged = dict(trainer.callback_metrics)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    logged.update(test)
    for key in ["train/loss_step", "train/loss_epoch"] + metrics:
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
        assert torch.isfinite(torch.as_tensor(logged[key])).all()


def test_training_step_returns_the_loss():
    model = LogisticRegressionModule(4, ADAM)
    model.log = lambda *args, **kwargs: None  # no Trainer attached
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6, 1)).float()
    loss = model.training_step((x, y), 0)
    assert loss.dim() == 0 and loss.requires_grad
    torch.testing.assert_close(loss, gpudl.ops.binary_cross_entropy_with_logits(model(x), y))


def test_r2_is_over_the_whole_split_not_per_batch(tmp_path):
    dm = DiabetesDataModule(batch_size=7)  # many small, uneven validation batches
    model = LinearRegressionModule(10, ADAM)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    X, y = dm.val_set.tensors
    with torch.no_grad():
        pred = model(X)
    r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    torch.testing.assert_close(trainer.callback_metrics["val/r2"], r2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trainer.callback_metrics["val/mse"], ((pred - y) ** 2).mean(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_hparams_are_plain_types(tmp_path):
    OmegaConf = pytest.importorskip("omegaconf", reason="needs omegaconf (the GPU check machine has none)").OmegaConf
    # Hydra hands nested containers over as ListConfig; the module must store plain tuples.
    channels = OmegaConf.create({"c": [4, 8]}).c
    model = CNNModule(channels=channels, hidden=16, optimizer=ADAM)
    dm = _digits()
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "cnn.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["channels"] == (4, 8)
    assert "optimizer" not in checkpoint["hyper_parameters"]
    restored = CNNModule(**checkpoint["hyper_parameters"])
    restored.load_state_dict(checkpoint["state_dict"])
    x = torch.rand(2, 1, 8, 8)
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_gan_checkpoint_loads_with_weights_only_and_excludes_the_judge(tmp_path):
    dm = _digits(64)
    gan = GANModule(hidden=16, latent_dim=4, judge_epochs=1, judge_hidden=8, num_eval_samples=20)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(gan, datamodule=dm)
    path = tmp_path / "gan.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["image_shape"] == (1, 8, 8)
    assert not any(k.startswith("judge") for k in checkpoint["state_dict"])
    restored = GANModule(**checkpoint["hyper_parameters"])
    restored.load_state_dict(checkpoint["state_dict"])
    # Testing a restored module retrains its judge (seeded) and scores the samples.
    result = _trainer(tmp_path).test(restored, datamodule=dm, verbose=False)[0]
    assert result["judge/acc"] == pytest.approx(gan.judge_acc)
    assert {"test/gen_confidence", "test/gen_classes", "test/gen_score", "test/fid", "baseline/gen_score",
            "baseline/fid", "baseline/fid_floor"} <= set(result)


# --------------------------------------------------------------------------- the GAN
def test_gan_sample_shape_and_range():
    gan = GANModule(image_shape=(1, 28, 28), hidden=16)
    images = gan.sample(7, generator=torch.Generator().manual_seed(0))
    assert images.shape == (7, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, gan.sample(7, generator=torch.Generator().manual_seed(0)))
    assert gan.sample(0).shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match="n must be"):
        gan.sample(-1)


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (1, 8, 8), (3, 16, 16)])
def test_dcgan_shapes_and_layers(image_shape):
    """The DCGAN: z -> [N, *image_shape] in [0, 1] through gpudl's transposed convolutions (tanh fused
    into the last), and images -> one logit through strided convolutions (leaky ReLU fused into the
    first, which has no BatchNorm)."""
    from gpudl.models.gan import DCGANDiscriminator, DCGANGenerator

    gan = GANModule(image_shape=image_shape, architecture="dcgan", channels=8, latent_dim=5)
    g, d = gan.generator, gan.discriminator
    assert isinstance(g, DCGANGenerator) and isinstance(d, DCGANDiscriminator)
    assert [type(m) for m in (g.project, g.up_1, g.up_2)] == [gpudl.nn.ConvTranspose2d] * 3
    assert g.up_2.activation == "tanh" and g.up_2.stride == (2, 2)
    assert [type(m) for m in (d.conv_1, d.conv_2, d.out)] == [gpudl.nn.Conv2d] * 3
    assert d.conv_1.activation == "leaky_relu" and d.conv_1.stride == d.conv_2.stride == (2, 2)
    z = torch.randn(6, 5)
    # Each layer's size: 1x1 -> side/4 -> side/2 -> side.
    side = image_shape[-1]
    assert g.project(z[:, :, None, None]).shape == (6, 16, side // 4, side // 4)
    images = g(z)
    assert images.shape == (6, *image_shape) and images.min() >= 0 and images.max() <= 1
    logits = d(images)
    assert logits.shape == (6, 1)
    assert d.conv_2(d.conv_1(images)).shape == (6, 16, side // 4, side // 4)
    # Gradients reach every parameter of both nets.
    (logits.sum()).backward()
    assert all(p.grad is not None for p in [*g.parameters(), *d.parameters()])
    samples = gan.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, *image_shape) and gan.generator.training  # sample() restores the mode
    assert gan.sample(0).shape == (0, *image_shape)


def test_dcgan_learns_digits_beyond_the_untrained_generator(tmp_path):
    """A few epochs on the 8x8 digits: the generated images' Fréchet distance to the real ones falls far
    below the untrained generator's, and above the real-vs-real floor."""
    torch.manual_seed(0)
    gan = GANModule(architecture="dcgan", image_shape=(1, 8, 8), channels=16, latent_dim=16, judge_epochs=5,
                    judge_hidden=64, num_eval_samples=200)
    trainer = _trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    trainer.fit(gan, datamodule=_digits(32))
    logged = trainer.callback_metrics
    assert logged["baseline/fid_floor"] < logged["val/fid"] < logged["baseline/fid"] / 4


def test_gan_manual_optimization_updates_both_nets(tmp_path):
    gan = GANModule(hidden=16, latent_dim=4, judge_epochs=1, judge_hidden=8, num_eval_samples=20, gradient_clip_val=1.0)
    assert gan.automatic_optimization is False
    g_before = [p.detach().clone() for p in gan.generator.parameters()]
    d_before = [p.detach().clone() for p in gan.discriminator.parameters()]
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(gan, datamodule=_digits(64))
    assert all(not torch.equal(a, b) for a, b in zip(g_before, gan.generator.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d_before, gan.discriminator.parameters()))
    assert trainer.global_step == 4  # two optimizer steps per batch
    logged = trainer.callback_metrics
    for key in ["train/d_loss_step", "train/g_loss_step", "train/loss_epoch", "val/loss", "val/gen_confidence",
                "val/gen_classes", "val/gen_score", "val/fid", "baseline/gen_confidence", "baseline/gen_classes",
                "baseline/fid", "baseline/fid_floor", "judge/acc"]:
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
    torch.testing.assert_close(
        logged["val/gen_score"], logged["val/gen_confidence"] * logged["val/gen_classes"] / 10, atol=1e-6, rtol=1e-5
    )


def test_gan_discriminator_step_does_not_reach_the_generator(tmp_path):
    gan = GANModule(hidden=16, latent_dim=4)
    seen = {}

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            if not seen:  # the first step of a batch is D's: G must have no gradient yet
                seen["g_grads"] = [p.grad for p in gan.generator.parameters()]
            return super().step(closure)

    gan.d_optimizer_factory = functools.partial(Spy, lr=0.01)
    gan.g_optimizer_factory = functools.partial(torch.optim.SGD, lr=0.01)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(gan, train_dataloaders=_ready_loader())
    assert seen["g_grads"] and all(g is None for g in seen["g_grads"])


def _ready_loader():
    dm = _digits(16)
    dm.setup()
    return dm.train_dataloader()


def test_gan_needs_a_datamodule_for_its_judge(tmp_path):
    gan = GANModule(hidden=8, latent_dim=4)
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="datamodule"):
        trainer.fit(gan, train_dataloaders=_ready_loader(), val_dataloaders=_ready_loader())


def test_gan_judge_rejects_non_digits():
    from gpudl.models.gan_quality import judge_scores, split_arrays, train_judge

    dm = _digits()
    dm.setup()
    judge, acc = train_judge(*split_arrays(dm, "train"), *split_arrays(dm, "test"), hidden=64, epochs=10)
    assert acc > 0.85
    real = judge_scores(judge, dm.test_set.tensors[0])
    gray = judge_scores(judge, torch.full((50, 1, 8, 8), 0.5))
    assert real["gen_classes"] == 10 and real["gen_confidence"] > 0.7
    assert gray["gen_classes"] <= 1 and gray["gen_confidence"] < 0.2


# --------------------------------------------------------------------------- backend independence
def test_backend_choice_reaches_the_model(device, launches):
    """The same attention model on the test device: under backend torch no Triton kernel runs,
    under backend triton the kernels run and give torch's logits."""
    torch.manual_seed(0)
    model = AttentionModule(embed_dim=16, num_heads=2, num_layers=1, mlp_dim=32, optimizer=ADAM).to(device).eval()
    x = torch.rand(3, 1, 8, 8, device=device)
    with gpudl.use_backend("torch"):
        want = model(x)
    assert len(launches) == 0, "backend torch launched a Triton kernel"
    with gpudl.use_backend("triton"):
        got = model(x)
    assert {"_attn_fwd", "_ln_fwd_kernel", "_matmul_kernel"} <= set(launches.kernels()), launches.kernels()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_logistic_regression_on_the_triton_backend(device, launches):
    model = LogisticRegressionModule(5, ADAM).to(device)
    x, y = torch.randn(9, 5, device=device), torch.randint(0, 2, (9, 1), device=device).float()
    ref = model.loss(model(x), y)
    (ref_grad,) = torch.autograd.grad(ref, model.linear.weight)
    with gpudl.use_backend("triton"):
        out = model.loss(model(x), y)
        (grad,) = torch.autograd.grad(out, model.linear.weight)
    assert {"_matmul_kernel", "_bce_fwd_kernel"} <= set(launches.kernels()), launches.kernels()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- targets (slow)
def _fit_test(tmp_path, dm, model, epochs):
    L.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, max_epochs=epochs)
    trainer.fit(model, datamodule=dm)
    return trainer.test(model, datamodule=dm, verbose=False)[0]


@pytest.mark.slow
def test_linear_regression_full_batch_gradient_descent_reaches_target(tmp_path):
    gd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.0)
    L.seed_everything(0, verbose=False)
    result = _fit_test(tmp_path, DiabetesDataModule(batch_size=None), LinearRegressionModule(10, gd), 40)
    assert result["test/r2"] >= 0.40


# The toy line's slope and intercept (linear regression by full-batch gradient descent, and by
# Adam) are checked on the experiment's own config: tests/test_train.py::test_toy_line_recovers_slope_and_intercept.


@pytest.mark.slow
def test_logistic_regression_reaches_target(tmp_path):
    gd = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.0)
    L.seed_everything(0, verbose=False)
    result = _fit_test(tmp_path, BreastCancerDataModule(batch_size=None), LogisticRegressionModule(30, gd), 40)
    assert result["test/acc"] >= 0.95


@pytest.mark.slow
def test_cnn_digits_reaches_target(tmp_path):
    L.seed_everything(0, verbose=False)
    result = _fit_test(tmp_path, DigitsDataModule(batch_size=64), CNNModule(), 15)
    assert result["test/acc"] >= 0.97


@pytest.mark.slow
def test_rnn_digits_reaches_target(tmp_path):
    L.seed_everything(0, verbose=False)
    result = _fit_test(tmp_path, DigitsDataModule(batch_size=64), RNNModule(), 30)
    assert result["test/acc"] >= 0.90


@pytest.mark.slow
def test_attention_digits_reaches_target(tmp_path):
    L.seed_everything(0, verbose=False)
    result = _fit_test(tmp_path, DigitsDataModule(batch_size=64), AttentionModule(), 20)
    assert result["test/acc"] >= 0.90


@pytest.mark.slow
def test_gan_digits_beats_its_untrained_generator(tmp_path):
    L.seed_everything(0, verbose=False)
    result = _fit_test(tmp_path, DigitsDataModule(batch_size=64), GANModule(), 40)
    assert result["test/gen_confidence"] > result["baseline/gen_confidence"] + 0.3
    assert result["test/gen_classes"] >= result["baseline/gen_classes"] + 5
    # Its Fréchet distance falls far below the untrained generator's, not below real vs real.
    assert result["baseline/fid_floor"] < result["test/fid"] < result["baseline/fid"] / 4

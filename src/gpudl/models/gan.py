"""A generative adversarial network (Goodfellow et al. 2014).

The generator G maps noise z ~ N(0, I) to an image; the discriminator D maps an image to a logit
"this is real". They play a two-player game: D minimizes
    softplus(-D(x)) + softplus(D(G(z)))            (real -> 1, fake -> 0)
and G minimizes the NON-SATURATING loss softplus(-D(G(z))) (make D call the fakes real), which
gives G strong gradients early, when D rejects its samples easily (Goodfellow et al., sec. 3).

Two optimizers take turns on every batch, so the module uses Lightning's manual optimization.
The fakes are detached for D's step: D's loss must not push gradients into G.

The networks are components (`gpudl.models.gan_networks`, built from the config's
`model/generator` and `model/discriminator`). Sample quality is measured by
`gpudl.models.gan_quality.GANQuality`, a judge classifier trained on the run's real images: each
validation and test epoch logs {stage}/gen_confidence, gen_classes, gen_score (monitored, mode max)
and fid; val/gen_score_best is the best val/gen_score so far (the best checkpoint's), what a sweep
optimizes, as classifiers return val/acc_best. The same numbers for the untrained generator are
logged once as baseline/*, with baseline/fid_floor (real training images against real test images).
"""

from __future__ import annotations

import copy

import lightning as L
import torch

from gpudl import ops
from gpudl.checks import check_factory, check_float, check_int, check_int_tuple
from gpudl.models.gan_networks import DCGANDiscriminator, DCGANGenerator, MLPDiscriminator, MLPGenerator
from gpudl.models.gan_quality import GANQuality

__all__ = ["GANModule", "MLPGenerator", "MLPDiscriminator", "DCGANGenerator", "DCGANDiscriminator"]

ARCHITECTURES = ("mlp", "dcgan")


class GANModule(L.LightningModule):
    """GAN on images [N, *image_shape] in [0, 1] (batches (images, labels); labels unused).

    generator, discriminator: the networks (`gan_networks`; the configs build them). Without them,
        `architecture` builds the default pair: "mlp" (width `hidden`) or "dcgan" (base width
        `channels`; square images, side a multiple of 4).
    optimizer: partial used for both nets unless g_optimizer / d_optimizer are given. None
        everywhere: Adam lr 2e-3, betas (0.5, 0.999) (DCGAN's betas; its lr 2e-4 is too slow
        for these small MLPs on a CPU budget).
    scheduler: partial applied to both optimizers, stepped once per epoch (a ReduceLROnPlateau
        watches val/gen_score, so give it mode='max').
    gradient_clip_val: clip each net's gradient norm (the Trainer's gradient_clip_val does not
        apply to manual optimization).
    judge_epochs, judge_hidden: the judge MLP's training and width.
    num_eval_samples: images judged at each validation and test epoch, from noise seeded by
        eval_seed (the same z every validation epoch, so epochs compare fairly).
    """

    def __init__(self, image_shape=(1, 8, 8), latent_dim: int = 32, generator: torch.nn.Module | None = None,
                 discriminator: torch.nn.Module | None = None, optimizer=None, scheduler=None, g_optimizer=None,
                 d_optimizer=None, judge_epochs: int = 10, judge_hidden: int = 256, num_eval_samples: int = 500,
                 gradient_clip_val: float | None = None, eval_seed: int = 0, architecture: str | None = "mlp",
                 hidden: int = 256, channels: int = 32):
        super().__init__()
        owner = type(self).__name__
        image_shape = check_int_tuple(owner, "image_shape", image_shape, length=3)
        latent_dim = check_int(owner, "latent_dim", latent_dim)
        judge_epochs = check_int(owner, "judge_epochs", judge_epochs)
        judge_hidden = check_int(owner, "judge_hidden", judge_hidden)
        num_eval_samples = check_int(owner, "num_eval_samples", num_eval_samples)
        gradient_clip_val = check_float(owner, "gradient_clip_val", gradient_clip_val, 0.0, low_open=True,
                                        allow_none=True)
        eval_seed = check_int(owner, "eval_seed", eval_seed, minimum=0)
        for name, value in (("optimizer", optimizer), ("scheduler", scheduler), ("g_optimizer", g_optimizer),
                            ("d_optimizer", d_optimizer)):
            check_factory(owner, name, value)
        if (generator is None) != (discriminator is None):
            raise ValueError(f"{owner}: give both generator and discriminator, or neither (then `architecture` "
                             f"builds them), got generator={type(generator).__name__}, "
                             f"discriminator={type(discriminator).__name__}")
        if generator is None:
            generator, discriminator = _default_networks(owner, architecture, image_shape, latent_dim, hidden,
                                                         channels)
        else:
            architecture = None  # the given networks, not a named pair, define the model
        for name, net in (("generator", generator), ("discriminator", discriminator)):
            if not isinstance(net, torch.nn.Module):
                raise TypeError(f"{owner}: {name} must be a torch.nn.Module, got {type(net).__name__}")
        self.save_hyperparameters(ignore=["generator", "discriminator", "optimizer", "scheduler", "g_optimizer",
                                          "d_optimizer"])
        self.automatic_optimization = False  # G and D take turns within each batch
        self.g_optimizer_factory = g_optimizer or optimizer
        self.d_optimizer_factory = d_optimizer or optimizer
        self.scheduler_factory = scheduler
        self.generator, self.discriminator = generator, discriminator
        self.quality = GANQuality(judge_hidden, judge_epochs, num_eval_samples, eval_seed)
        # The untrained generator, kept outside the state_dict, for the baseline/* metrics.
        self._initial_generator_state = copy.deepcopy(self.generator.state_dict())
        self._baseline: dict[str, float] | None = None
        self._best_gen_score: float | None = None  # the running max of val/gen_score

    @property
    def judge_acc(self) -> float | None:
        """The judge's accuracy on the real test images (None before it is trained)."""
        return self.quality.judge_acc

    # ------------------------------------------------------------------ model
    def forward(self, z):
        """z [N, latent_dim] -> images [N, *image_shape] in [0, 1]."""
        return self.generator(z)

    def compiled_modules(self) -> list[torch.nn.Module]:
        """What `compile.enabled=true` compiles: the training step calls both networks directly."""
        return [self.generator, self.discriminator]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images [n, *image_shape] in [0, 1] from fresh noise (a CPU torch.Generator seeds it)."""
        check_int("GANModule.sample", "n", n, minimum=0)
        z = torch.randn(n, self.hparams.latent_dim, generator=generator).to(self.device)
        if n == 0:  # the DCGAN's batch statistics need a batch
            return torch.empty(0, *self.hparams.image_shape, device=self.device)
        was_training = self.generator.training
        self.generator.eval()
        images = self.generator(z)
        self.generator.train(was_training)
        return images

    def configure_optimizers(self):
        def make(net, factory):
            if factory is None:
                return torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.5, 0.999))
            return factory(params=net.parameters())

        optimizers = [make(self.generator, self.g_optimizer_factory),
                      make(self.discriminator, self.d_optimizer_factory)]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizer=opt) for opt in optimizers]

    # ------------------------------------------------------------------ training
    def _images(self, batch):
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def _clip(self, optimizer):
        if self.hparams.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val,
                                gradient_clip_algorithm="norm")

    def training_step(self, batch, batch_idx):
        real = self._images(batch)
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=real.device, dtype=real.dtype)
        fake = self.generator(z)

        # Discriminator step: real -> 1, fake -> 0. Detached fakes: no gradient into G here.
        self.toggle_optimizer(opt_d)
        d_loss = ops.gan_discriminator_loss(self.discriminator(real), self.discriminator(fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        self._clip(opt_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        # Generator step: the just-updated D should call the same fakes real.
        self.toggle_optimizer(opt_g)
        g_loss = ops.gan_generator_loss(self.discriminator(fake))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self._clip(opt_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        n = real.shape[0]
        self.log("train/d_loss", d_loss.detach(), on_step=True, on_epoch=True, batch_size=n)
        self.log("train/g_loss", g_loss.detach(), on_step=True, on_epoch=True, batch_size=n)
        loss = (d_loss + g_loss).detach()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def on_train_epoch_end(self):
        schedulers = self.lr_schedulers()
        schedulers = [] if schedulers is None else schedulers if isinstance(schedulers, list) else [schedulers]
        for scheduler in schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                score = self.trainer.callback_metrics.get("val/gen_score")
                if score is not None:
                    scheduler.step(score)
            else:
                scheduler.step()

    # ------------------------------------------------------------------ evaluation
    def _eval_losses(self, batch, batch_idx, stage):
        real = self._images(batch)
        # Seeded noise: the evaluation must not draw from (and so shift) the training RNG stream.
        g = torch.Generator().manual_seed(self.hparams.eval_seed + 1 + batch_idx)
        z = torch.randn(real.shape[0], self.hparams.latent_dim, generator=g).to(real)
        fake = self.generator(z)
        d_loss = ops.gan_discriminator_loss(self.discriminator(real), self.discriminator(fake))
        g_loss = ops.gan_generator_loss(self.discriminator(fake))
        n = real.shape[0]
        self.log(f"{stage}/d_loss", d_loss, on_epoch=True, batch_size=n)
        self.log(f"{stage}/g_loss", g_loss, on_epoch=True, batch_size=n)
        self.log(f"{stage}/loss", d_loss + g_loss, on_epoch=True, prog_bar=True, batch_size=n)

    def validation_step(self, batch, batch_idx):
        self._eval_losses(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_losses(batch, batch_idx, "test")

    def on_fit_start(self):
        if getattr(self.trainer, "datamodule", None) is not None:
            self._fit_quality()  # before training, so the judge's seconds do not land mid-epoch

    def on_test_start(self):
        self._fit_quality()  # a module loaded from a checkpoint has no judge: train it again (seeded)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._log_quality("val")

    def on_test_epoch_end(self):
        self._log_quality("test")

    def _fit_quality(self):
        if self.quality.fitted:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError(
                "GANModule measures sample quality with a judge classifier trained on the real training images, "
                "so it needs a LightningDataModule: call trainer.fit/test(model, datamodule=...)"
            )
        self.quality.fit(datamodule, self.hparams.image_shape)

    def _log_quality(self, stage):
        self._fit_quality()
        # Test judges fresh noise (seed + 1); every validation epoch judges the same noise.
        seed = self.hparams.eval_seed + (stage == "test")
        scores = self.quality.score(self.generator, self.hparams.latent_dim, seed, reference=stage)
        for key, value in scores.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "gen_score", sync_dist=True)
        if stage == "val":
            # Every rank judges the same seeded noise, so every rank keeps the same maximum.
            best = self._best_gen_score
            self._best_gen_score = scores["gen_score"] if best is None else max(best, scores["gen_score"])
            self.log("val/gen_score_best", self._best_gen_score, sync_dist=True)
        if self._baseline is None:
            untrained = copy.deepcopy(self.generator)
            untrained.load_state_dict(self._initial_generator_state)
            self._baseline = self.quality.score(untrained, self.hparams.latent_dim, self.hparams.eval_seed,
                                                reference="test")
            self._baseline["fid_floor"] = self.quality.fid_floor
        for key, value in self._baseline.items():
            self.log(f"baseline/{key}", value, sync_dist=True)
        # The judge's own quality: accuracy and mean top-1 probability on real test images.
        self.log("judge/acc", self.quality.judge_acc, sync_dist=True)
        self.log("judge/real_confidence", self.quality.judge_real_confidence, sync_dist=True)

    # The running best travels in checkpoints, so a resumed run keeps it.
    def on_save_checkpoint(self, checkpoint):
        if self._best_gen_score is not None:
            checkpoint["val_gen_score_best"] = self._best_gen_score

    def on_load_checkpoint(self, checkpoint):
        self._best_gen_score = checkpoint.get("val_gen_score_best")


def _default_networks(owner: str, architecture: str | None, image_shape: tuple[int, int, int], latent_dim: int,
                      hidden: int, channels: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The (generator, discriminator) pair `architecture` names, for modules built in Python."""
    if architecture == "mlp":
        return MLPGenerator(latent_dim, hidden, image_shape), MLPDiscriminator(hidden, image_shape)
    if architecture == "dcgan":
        return DCGANGenerator(latent_dim, channels, image_shape), DCGANDiscriminator(channels, image_shape)
    raise ValueError(f"{owner}: architecture must be one of {ARCHITECTURES} when no networks are given, "
                     f"got {architecture!r}")

"""A generative adversarial network (Goodfellow et al. 2014): two MLPs (architecture="mlp") or a
DCGAN (Radford et al. 2016; architecture="dcgan"), transposed convolutions against strided ones.

The generator G maps noise z ~ N(0, I) to an image; the discriminator D maps an image to a logit
"this is real". They play a two-player game: D minimizes
    softplus(-D(x)) + softplus(D(G(z)))            (real -> 1, fake -> 0)
and G minimizes the NON-SATURATING loss softplus(-D(G(z))) (make D call the fakes real), which
gives G strong gradients early, when D rejects its samples easily (Goodfellow et al., sec. 3).

Two optimizers take turns on every batch, so the module uses Lightning's manual optimization.
The fakes are detached for D's step: D's loss must not push gradients into G.

GAN losses do not say how good the samples are, so quality is MEASURED: a judge classifier is
trained on the run's real training images, and each validation/test epoch it classifies
`num_eval_samples` generated images. Good samples look like confident digits of every class:
    gen_confidence = mean top-1 probability,  gen_classes = distinct predicted classes,
    gen_score = gen_confidence * gen_classes / num_classes   (monitor it, mode max).
val/gen_score_best is the best val/gen_score so far (the score of the best checkpoint), what a
sweep optimizes, as classifiers return val/acc_best.
The same numbers for the untrained generator (its initial weights) are logged as baseline/*.

{stage}/fid is a Fréchet distance (FID, Heusel et al. 2017, gpudl.fid) between Gaussian fits of the
judge's penultimate-layer features of the generated images and of held-out real images (the val
split at validation, the test split at test). Beside it, once per run: baseline/fid, the untrained
generator's against the test split, and baseline/fid_floor, the training split's against the test
split (what a generator that reproduces real images exactly would score, up to sample size).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch

from gpudl import nn, ops
from gpudl.checks import check_factory, check_float, check_int, check_int_tuple
from gpudl.fid import frechet_distance, gaussian_fit
from gpudl.reference import LEAKY_RELU_SLOPE


class Generator(torch.nn.Module):
    """z [N, latent_dim] -> images [N, *image_shape] in [0, 1] (a sigmoid output, matching data
    scaled to [0, 1])."""

    def __init__(self, latent_dim: int, hidden: int, image_shape: tuple[int, ...]):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.fc_1 = nn.Linear(latent_dim, hidden, activation="leaky_relu")
        self.fc_2 = nn.Linear(hidden, hidden, activation="leaky_relu")
        self.out = nn.Linear(hidden, math.prod(image_shape), activation="sigmoid")

    def forward(self, z):
        return self.out(self.fc_2(self.fc_1(z))).view(z.shape[0], *self.image_shape)


class Discriminator(torch.nn.Module):
    """images [N, *image_shape] -> logits [N, 1]. Leaky ReLU keeps a gradient for G to follow
    where a ReLU would be flat."""

    def __init__(self, hidden: int, image_shape: tuple[int, ...]):
        super().__init__()
        self.fc_1 = nn.Linear(math.prod(image_shape), hidden, activation="leaky_relu")
        self.fc_2 = nn.Linear(hidden, hidden, activation="leaky_relu")
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(self.fc_2(self.fc_1(x.flatten(1))))


class DCGANGenerator(torch.nn.Module):
    """The DCGAN generator (Radford et al. 2016): z [N, latent_dim] -> images [N, C, H, W] in [0, 1]
    (H = W, a multiple of 4). Transposed convolutions only: z as a 1x1 map projected to
    (H/4)x(H/4) x 2*channels, then two stride-2 4x4 up-samplings (x2 each), BatchNorm + ReLU between
    them, and tanh fused into the last one (rescaled to the data's [0, 1]).

    Its BatchNorms normalize with the statistics of the batch being generated, in evaluation too
    (no running averages): the generator's weights move every step, and running averages of its
    activations lagged so far behind that eval-mode samples scored 0 where the same weights with
    batch statistics scored 0.64 (dcgan_mnist, half an epoch in). Batches of a few hundred judged
    images make those statistics stable."""

    def __init__(self, latent_dim: int, channels: int, image_shape: tuple[int, ...]):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, size = image_shape[0], image_shape[-1]
        # Biases before a BatchNorm are cancelled by its mean subtraction: none there.
        self.project = nn.ConvTranspose2d(latent_dim, 2 * channels, size // 4, bias=False)
        self.bn_1 = torch.nn.BatchNorm2d(2 * channels, track_running_stats=False)
        self.up_1 = nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1, bias=False)
        self.bn_2 = torch.nn.BatchNorm2d(channels, track_running_stats=False)
        self.up_2 = nn.ConvTranspose2d(channels, c, 4, stride=2, padding=1, activation="tanh")

    def forward(self, z):
        x = torch.relu(self.bn_1(self.project(z[:, :, None, None])))
        x = torch.relu(self.bn_2(self.up_1(x)))
        return 0.5 * (self.up_2(x) + 1)  # tanh's [-1, 1] -> the data's [0, 1]


class DCGANDiscriminator(torch.nn.Module):
    """The DCGAN discriminator: images [N, C, H, W] -> logits [N, 1]. Two stride-2 4x4 convolutions
    (H -> H/2 -> H/4) with leaky ReLU, the first fused into its convolution (no BatchNorm on the
    input layer, as in the paper), the second after a BatchNorm; a (H/4)x(H/4) convolution to one
    logit."""

    def __init__(self, channels: int, image_shape: tuple[int, ...]):
        super().__init__()
        c, size = image_shape[0], image_shape[-1]
        self.conv_1 = nn.Conv2d(c, channels, 4, stride=2, padding=1, activation="leaky_relu")
        self.conv_2 = nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1, bias=False)
        self.bn_2 = torch.nn.BatchNorm2d(2 * channels)
        self.out = nn.Conv2d(2 * channels, 1, size // 4)

    def forward(self, x):
        x = torch.nn.functional.leaky_relu(self.bn_2(self.conv_2(self.conv_1(x))), LEAKY_RELU_SLOPE)
        return self.out(x).flatten(1)


ARCHITECTURES = ("mlp", "dcgan")


class GANModule(L.LightningModule):
    """GAN on images [N, *image_shape] in [0, 1] (batches (images, labels); labels unused).

    architecture: "mlp" (Generator/Discriminator, width `hidden`) or "dcgan"
        (DCGANGenerator/DCGANDiscriminator, base width `channels`; square images, side a multiple of 4).

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

    def __init__(self, image_shape=(1, 8, 8), latent_dim: int = 32, hidden: int = 256, optimizer=None, scheduler=None,
                 g_optimizer=None, d_optimizer=None, judge_epochs: int = 10, judge_hidden: int = 256,
                 num_eval_samples: int = 500, gradient_clip_val: float | None = None, eval_seed: int = 0,
                 architecture: str = "mlp", channels: int = 32):
        super().__init__()
        owner = type(self).__name__
        image_shape = check_int_tuple(owner, "image_shape", image_shape, length=3)
        latent_dim = check_int(owner, "latent_dim", latent_dim)
        hidden = check_int(owner, "hidden", hidden)
        channels = check_int(owner, "channels", channels)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"{owner}: architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if architecture == "dcgan" and (image_shape[1] != image_shape[2] or image_shape[1] % 4):
            raise ValueError(f"{owner}: architecture='dcgan' needs square images with a side divisible by 4 "
                             f"(two stride-2 layers), got image_shape {image_shape}")
        judge_epochs = check_int(owner, "judge_epochs", judge_epochs)
        judge_hidden = check_int(owner, "judge_hidden", judge_hidden)
        num_eval_samples = check_int(owner, "num_eval_samples", num_eval_samples)
        gradient_clip_val = check_float(owner, "gradient_clip_val", gradient_clip_val, 0.0, low_open=True,
                                        allow_none=True)
        eval_seed = check_int(owner, "eval_seed", eval_seed, minimum=0)
        for name, value in (("optimizer", optimizer), ("scheduler", scheduler), ("g_optimizer", g_optimizer),
                            ("d_optimizer", d_optimizer)):
            check_factory(owner, name, value)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "g_optimizer", "d_optimizer"])
        self.automatic_optimization = False  # G and D take turns within each batch
        self.g_optimizer_factory = g_optimizer or optimizer
        self.d_optimizer_factory = d_optimizer or optimizer
        self.scheduler_factory = scheduler

        if architecture == "dcgan":
            self.generator = DCGANGenerator(latent_dim, channels, image_shape)
            self.discriminator = DCGANDiscriminator(channels, image_shape)
        else:
            self.generator = Generator(latent_dim, hidden, image_shape)
            self.discriminator = Discriminator(hidden, image_shape)
        # The untrained generator, kept outside the state_dict, for the baseline/* metrics.
        self._initial_generator_state = copy.deepcopy(self.generator.state_dict())
        self._set_judge(None, None)
        self._baseline: dict[str, float] | None = None
        self._best_gen_score: float | None = None  # the running max of val/gen_score

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
            self._ensure_judge()  # before training, so the judge's seconds do not land mid-epoch

    def on_test_start(self):
        self._ensure_judge()  # a module loaded from a checkpoint has no judge: retrain it (seeded)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._log_quality("val")

    def on_test_epoch_end(self):
        self._log_quality("test")

    def _log_quality(self, stage):
        self._ensure_judge()
        # Test judges fresh noise (seed + 1); every validation epoch judges the same noise.
        scores = self.judge_generator(self.generator, self.hparams.eval_seed + (stage == "test"), reference=stage)
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
            self._baseline = self.judge_generator(untrained, reference="test")
            self._baseline["fid_floor"] = self.fid_floor
        for key, value in self._baseline.items():
            self.log(f"baseline/{key}", value, sync_dist=True)
        # The judge's own quality: accuracy and mean top-1 probability on real test images.
        self.log("judge/acc", self.judge_acc, sync_dist=True)
        self.log("judge/real_confidence", self.judge_real_confidence, sync_dist=True)

    # The running best travels in checkpoints, so a resumed run keeps it.
    def on_save_checkpoint(self, checkpoint):
        if self._best_gen_score is not None:
            checkpoint["val_gen_score_best"] = self._best_gen_score

    def on_load_checkpoint(self, checkpoint):
        self._best_gen_score = checkpoint.get("val_gen_score_best")

    @torch.no_grad()
    def judge_generator(self, generator: torch.nn.Module, seed: int | None = None,
                        reference: str = "test") -> dict[str, float]:
        """Judge num_eval_samples images of `generator` made from noise seeded by `seed` (default
        eval_seed). Returns {gen_confidence, gen_classes, gen_score, fid}, the fid against the real
        images of the `reference` split ("val" or "test")."""
        if reference not in ("val", "test"):
            raise ValueError(f"GANModule.judge_generator: reference must be 'val' or 'test', got {reference!r}")
        if self.judge is None:
            raise RuntimeError("GANModule: the judge is not trained yet (it is trained when fit or test starts)")
        g = torch.Generator().manual_seed(self.hparams.eval_seed if seed is None else seed)
        z = torch.randn(self.hparams.num_eval_samples, self.hparams.latent_dim, generator=g)
        was_training = generator.training
        generator.eval()
        images = generator(z.to(self.device, next(generator.parameters()).dtype))
        generator.train(was_training)
        scores = judge_scores(self.judge, images)
        generated_stats = gaussian_fit(judge_features(self.judge, images))
        scores["fid"] = frechet_distance(*generated_stats, *self._real_stats[reference])
        return scores

    # ------------------------------------------------------------------ the judge
    def _ensure_judge(self):
        if self.judge is not None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise RuntimeError(
                "GANModule measures sample quality with a judge classifier trained on the real training images, "
                "so it needs a LightningDataModule: call trainer.fit/test(model, datamodule=...)"
            )
        X_train, y_train = _split_arrays(dm, "train")
        X_val, _ = _split_arrays(dm, "val")
        X_test, y_test = _split_arrays(dm, "test")
        if X_train.shape[1:] != tuple(self.hparams.image_shape):
            raise ValueError(f"GANModule: image_shape is {tuple(self.hparams.image_shape)} but the data's images are "
                             f"{tuple(X_train.shape[1:])}")
        judge, acc = train_judge(
            X_train, y_train, X_test, y_test, self.hparams.judge_hidden, self.hparams.judge_epochs,
            seed=self.hparams.eval_seed,
        )
        self._set_judge(judge, acc, judge_scores(judge, X_test)["gen_confidence"])
        # The real images' feature statistics, computed once: the fid references and the floor.
        train_stats = gaussian_fit(judge_features(judge, X_train))
        self._real_stats = {"val": gaussian_fit(judge_features(judge, X_val)),
                            "test": gaussian_fit(judge_features(judge, X_test))}
        self.fid_floor = frechet_distance(*train_stats, *self._real_stats["test"])

    def _set_judge(self, judge: torch.nn.Module | None, acc: float | None, real_confidence: float | None = None):
        # Bypass nn.Module registration: the judge is an instrument, not part of the model, so it
        # stays out of the state_dict (checkpoints load into a fresh module) and on the CPU.
        object.__setattr__(self, "judge", judge)
        self.judge_acc, self.judge_real_confidence = acc, real_confidence
        self._real_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fid_floor: float | None = None


@torch.no_grad()
def judge_scores(judge: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """The judge's verdict on images [N, ...]: mean top-1 digit probability, distinct digit classes
    among the predictions (the "not a digit" class counts for neither), and their product score."""
    probs = judge(images.detach().float().cpu().flatten(1)).softmax(-1)
    num_classes = probs.shape[-1] - 1
    top = probs[:, :num_classes].max(-1)
    prediction = probs.argmax(-1)
    classes = prediction[prediction < num_classes].unique().numel()
    confidence = top.values.mean().item()
    return {"gen_confidence": confidence, "gen_classes": float(classes),
            "gen_score": confidence * classes / num_classes}


@torch.no_grad()
def judge_features(judge: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The judge's penultimate-layer activations (after its hidden ReLU) for images [N, ...]:
    the features the GANs' FID compares."""
    return judge[:-1](images.detach().float().cpu().flatten(1))


def _split_arrays(dm, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of a datamodule split, as CPU tensors."""
    dataset = getattr(dm, f"{split}_set", None)
    if dataset is not None and hasattr(dataset, "tensors"):
        X, y = dataset.tensors[:2]
    else:
        batches = list(getattr(dm, f"{split}_dataloader")())
        X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return X.detach().float().cpu(), y.detach().long().cpu().reshape(-1)


def _junk(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Non-digit images shaped like the batch x [B, D] in [0, 1]: uniform noise, blank images of a
    random gray level, and x with its pixels shuffled (the ink without the strokes)."""
    b, d = x.shape
    kind = torch.randint(0, 3, (b, 1), generator=g)
    noise = torch.rand(b, d, generator=g)
    blank = torch.rand(b, 1, generator=g).expand(b, d)
    shuffled = x[:, torch.randperm(d, generator=g)]
    return torch.where(kind == 0, noise, torch.where(kind == 1, blank, shuffled))


def train_judge(X_train, y_train, X_test, y_test, hidden: int, epochs: int, seed: int = 0, batch_size: int = 64,
                lr: float = 3e-3):
    """Train the judge: an MLP on flattened images, with plain torch on the CPU so the measurement
    does not depend on the backend (or kernels) under test. Seeded and run under fork_rng, so it
    is reproducible and leaves the training RNG stream untouched.

    Besides the K digit classes it learns a K+1-th "not a digit" class from noise, blank and
    pixel-shuffled images: a plain ReLU classifier is overconfident far from its data (it gave
    the untrained generator's gray MNIST images 0.95 top-1 probability), and the judge must
    reject such images rather than call them a confident digit.
    Returns (judge mapping [N, D] -> logits [N, K + 1], its accuracy on the test split)."""
    X_train, X_test = X_train.flatten(1), X_test.flatten(1)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    # Also called from on_test_start, inside Lightning's inference mode: switch autograd back on.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = torch.nn.Sequential(
            torch.nn.Linear(X_train.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes + 1)
        )
        opt = torch.optim.Adam(judge.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(X_train.shape[0], generator=g).split(batch_size):
                x = torch.cat([X_train[idx], _junk(X_train[idx], g)])
                y = torch.cat([y_train[idx], torch.full((idx.numel(),), num_classes)])
                loss = torch.nn.functional.cross_entropy(judge(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (judge(X_test).argmax(-1) == y_test).float().mean().item()
    return judge, acc

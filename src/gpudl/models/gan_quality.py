"""How good a GAN's samples are, measured by a judge classifier trained on the run's real images.

GAN losses do not say how good the samples are. `GANQuality.fit(datamodule)` trains a judge (an
MLP, plain torch on the CPU, so the measurement does not depend on the backend or kernels under
test) on the real training images, with a K+1-th "not a digit" class learned from noise, blank
and pixel-shuffled images; `GANQuality.score(generator, ...)` then judges `num_samples` generated
images:

    gen_confidence = mean top-1 digit probability,   gen_classes = distinct predicted digit classes,
    gen_score      = gen_confidence * gen_classes / K,
    fid            = Fréchet distance (Heusel et al. 2017, gpudl.fid) between Gaussian fits of the
                     judge's penultimate-layer features of the generated images and of held-out
                     real images (the val or the test split).

`fid_floor` is the training split's distance to the test split: what a generator that reproduces
real images exactly would score, up to sample size. The features are the judge's, not an
Inception network's, so the values compare runs of this repository, not published FIDs.
"""

from __future__ import annotations

import torch

from gpudl.fid import frechet_distance, gaussian_fit

REFERENCE_SPLITS = ("val", "test")


class GANQuality:
    """The judge of one run and the real images' feature statistics. Not an nn.Module: an
    instrument, not part of the model, so it stays out of checkpoints and on the CPU; a module
    loaded from a checkpoint fits it again (seeded, so to the same judge)."""

    def __init__(self, judge_hidden: int, judge_epochs: int, num_samples: int, seed: int):
        self.judge_hidden, self.judge_epochs = judge_hidden, judge_epochs
        self.num_samples, self.seed = num_samples, seed
        self.judge: torch.nn.Module | None = None
        self.judge_acc: float | None = None  # on the real test images
        self.judge_real_confidence: float | None = None  # mean top-1 probability on the real test images
        self.fid_floor: float | None = None
        self._real_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def fitted(self) -> bool:
        return self.judge is not None

    def fit(self, datamodule, image_shape: tuple[int, ...]) -> None:
        """Train the judge on the datamodule's training images; fit the real features' Gaussians."""
        X_train, y_train = split_arrays(datamodule, "train")
        X_val, _ = split_arrays(datamodule, "val")
        X_test, y_test = split_arrays(datamodule, "test")
        if X_train.shape[1:] != tuple(image_shape):
            raise ValueError(f"GANModule: image_shape is {tuple(image_shape)} but the data's images are "
                             f"{tuple(X_train.shape[1:])}")
        self.judge, self.judge_acc = train_judge(X_train, y_train, X_test, y_test, self.judge_hidden,
                                                 self.judge_epochs, seed=self.seed)
        self.judge_real_confidence = judge_scores(self.judge, X_test)["gen_confidence"]
        train_stats = gaussian_fit(judge_features(self.judge, X_train))
        self._real_stats = {"val": gaussian_fit(judge_features(self.judge, X_val)),
                            "test": gaussian_fit(judge_features(self.judge, X_test))}
        self.fid_floor = frechet_distance(*train_stats, *self._real_stats["test"])

    @torch.no_grad()
    def score(self, generator: torch.nn.Module, latent_dim: int, seed: int, reference: str) -> dict[str, float]:
        """Judge `num_samples` images of `generator` (in eval mode) from noise seeded by `seed`.
        Returns {gen_confidence, gen_classes, gen_score, fid}, the fid against the real images of
        the `reference` split ("val" or "test")."""
        if reference not in REFERENCE_SPLITS:
            raise ValueError(f"GANQuality.score: reference must be 'val' or 'test', got {reference!r}")
        if not self.fitted:
            raise RuntimeError("GANModule: the judge is not trained yet (it is trained when fit or test starts)")
        z = torch.randn(self.num_samples, latent_dim, generator=torch.Generator().manual_seed(seed))
        parameter = next(generator.parameters())
        was_training = generator.training
        generator.eval()
        images = generator(z.to(parameter.device, parameter.dtype))
        generator.train(was_training)
        scores = judge_scores(self.judge, images)
        generated_stats = gaussian_fit(judge_features(self.judge, images))
        scores["fid"] = frechet_distance(*generated_stats, *self._real_stats[reference])
        return scores


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
    """The judge's penultimate-layer activations (after its hidden ReLU) for images [N, ...]: the
    features the FID compares."""
    return judge[:-1](images.detach().float().cpu().flatten(1))


def split_arrays(datamodule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (images, labels) of a datamodule split, as CPU tensors."""
    dataset = getattr(datamodule, f"{split}_set", None)
    if dataset is not None and hasattr(dataset, "tensors"):
        X, y = dataset.tensors[:2]
    else:
        batches = list(getattr(datamodule, f"{split}_dataloader")())
        X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return X.detach().float().cpu(), y.detach().long().cpu().reshape(-1)


def _non_digits(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
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
    """Train the judge: an MLP on flattened images. Seeded and run under fork_rng, so it is
    reproducible and leaves the training RNG stream untouched.

    The K+1-th "not a digit" class is there because a plain ReLU classifier is overconfident far
    from its data: without it, gray blobs from an untrained generator would score as confident
    digits (`tests/test_models.py::test_gan_judge_rejects_non_digits` holds that line).
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
                x = torch.cat([X_train[idx], _non_digits(X_train[idx], g)])
                y = torch.cat([y_train[idx], torch.full((idx.numel(),), num_classes)])
                loss = torch.nn.functional.cross_entropy(judge(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    judge.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (judge(X_test).argmax(-1) == y_test).float().mean().item()
    return judge, acc

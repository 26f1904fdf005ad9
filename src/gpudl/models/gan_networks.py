"""The GAN's generator and discriminator networks, built from the config (`model/generator`,
`model/discriminator`) and handed to `GANModule`.

    MLPGenerator / MLPDiscriminator     two hidden layers on flattened images (Goodfellow et al. 2014)
    DCGANGenerator / DCGANDiscriminator transposed convolutions against strided ones (Radford et al. 2016)

Every generator maps z [N, latent_dim] to images [N, *image_shape] in [0, 1] (the data's range);
every discriminator maps images [N, *image_shape] to logits [N, 1] ("this is real").
"""

from __future__ import annotations

import math

import torch

from gpudl import nn
from gpudl.checks import check_int, check_int_tuple
from gpudl.reference import LEAKY_RELU_SLOPE


class MLPGenerator(torch.nn.Module):
    """z [N, latent_dim] -> images [N, *image_shape] in [0, 1] (a sigmoid output)."""

    def __init__(self, latent_dim: int, hidden: int, image_shape: tuple[int, ...]):
        super().__init__()
        owner = type(self).__name__
        self.image_shape = check_int_tuple(owner, "image_shape", image_shape, length=3)
        latent_dim, hidden = check_int(owner, "latent_dim", latent_dim), check_int(owner, "hidden", hidden)
        self.fc_1 = nn.Linear(latent_dim, hidden, activation="leaky_relu")
        self.fc_2 = nn.Linear(hidden, hidden, activation="leaky_relu")
        self.out = nn.Linear(hidden, math.prod(self.image_shape), activation="sigmoid")

    def forward(self, z):
        return self.out(self.fc_2(self.fc_1(z))).view(z.shape[0], *self.image_shape)


class MLPDiscriminator(torch.nn.Module):
    """images [N, *image_shape] -> logits [N, 1]. Leaky ReLU keeps a gradient for G to follow where
    a ReLU would be flat."""

    def __init__(self, hidden: int, image_shape: tuple[int, ...]):
        super().__init__()
        owner = type(self).__name__
        image_shape = check_int_tuple(owner, "image_shape", image_shape, length=3)
        hidden = check_int(owner, "hidden", hidden)
        self.fc_1 = nn.Linear(math.prod(image_shape), hidden, activation="leaky_relu")
        self.fc_2 = nn.Linear(hidden, hidden, activation="leaky_relu")
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(self.fc_2(self.fc_1(x.flatten(1))))


def _dcgan_image_shape(owner: str, image_shape) -> tuple[int, int, int]:
    image_shape = check_int_tuple(owner, "image_shape", image_shape, length=3)
    if image_shape[1] != image_shape[2] or image_shape[1] % 4:
        raise ValueError(f"{owner}: the DCGAN needs square images with a side divisible by 4 "
                         f"(two stride-2 layers), got image_shape {image_shape}")
    return image_shape


class DCGANGenerator(torch.nn.Module):
    """z [N, latent_dim] -> images [N, C, H, W] in [0, 1] (H = W, a multiple of 4), channels_last.
    Transposed convolutions only: z as a 1x1 map projected to (H/4)x(H/4) x 2*channels, then two
    stride-2 4x4 up-samplings (x2 each), BatchNorm + ReLU between them, and tanh fused into the last
    one (rescaled to the data's [0, 1]).

    Its BatchNorms normalize with the statistics of the batch being generated, in evaluation too
    (`track_running_stats=False`): the generator's weights move every step, and running averages
    of its activations lag behind them, so eval-mode samples judged far worse than the same weights
    with batch statistics. Batches of a few hundred judged images keep those statistics stable."""

    def __init__(self, latent_dim: int, channels: int, image_shape: tuple[int, ...]):
        super().__init__()
        owner = type(self).__name__
        self.image_shape = _dcgan_image_shape(owner, image_shape)
        latent_dim, channels = check_int(owner, "latent_dim", latent_dim), check_int(owner, "channels", channels)
        c, size = self.image_shape[0], self.image_shape[-1]
        # Biases before a BatchNorm are cancelled by its mean subtraction: none there.
        self.project = nn.ConvTranspose2d(latent_dim, 2 * channels, size // 4, bias=False)
        self.bn_1 = torch.nn.BatchNorm2d(2 * channels, track_running_stats=False)
        self.up_1 = nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1, bias=False)
        self.bn_2 = torch.nn.BatchNorm2d(channels, track_running_stats=False)
        self.up_2 = nn.ConvTranspose2d(channels, c, 4, stride=2, padding=1, activation="tanh")

    def forward(self, z):
        x = z[:, :, None, None].contiguous(memory_format=torch.channels_last)
        x = torch.relu(self.bn_1(self.project(x)))
        x = torch.relu(self.bn_2(self.up_1(x)))
        return 0.5 * (self.up_2(x) + 1)  # tanh's [-1, 1] -> the data's [0, 1]


class DCGANDiscriminator(torch.nn.Module):
    """images [N, C, H, W] -> logits [N, 1]. Two stride-2 4x4 convolutions (H -> H/2 -> H/4) with
    leaky ReLU, the first fused into its convolution (no BatchNorm on the input layer, as in the
    paper), the second after a BatchNorm; a (H/4)x(H/4) convolution to one logit."""

    def __init__(self, channels: int, image_shape: tuple[int, ...]):
        super().__init__()
        owner = type(self).__name__
        c, size = _dcgan_image_shape(owner, image_shape)[0], image_shape[-1]
        channels = check_int(owner, "channels", channels)
        self.conv_1 = nn.Conv2d(c, channels, 4, stride=2, padding=1, activation="leaky_relu")
        self.conv_2 = nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1, bias=False)
        self.bn_2 = torch.nn.BatchNorm2d(2 * channels)
        self.out = nn.Conv2d(2 * channels, 1, size // 4)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        x = torch.nn.functional.leaky_relu(self.bn_2(self.conv_2(self.conv_1(x))), LEAKY_RELU_SLOPE)
        return self.out(x).flatten(1)

"""A LeNet-style convolutional network (LeCun et al. 1998), in today's dress: 3x3 convolutions
with ReLU fused into the convolution (one kernel, no extra pass over the feature map), 2x2 max
pooling after each, then a two-layer classifier head.

Convolutions share one small filter across every position, so the network learns stroke
detectors once and finds them anywhere; pooling halves the resolution, buying a little
translation tolerance and a wider receptive field for the next block.
"""

from __future__ import annotations

import torch

from gpudl import nn, ops
from gpudl.checks import check_float, check_int, check_int_tuple
from gpudl.models._base import ClassificationModule


class CNNModule(ClassificationModule):
    """images [N, in_channels, image_size, image_size] -> logits [N, num_classes].

    channels: output channels of each conv block (conv 3x3 'same' + relu -> max-pool 2x2), so the
    feature map shrinks by 2**len(channels) (floor at each block). hidden: width of the head's
    hidden layer; dropout: before the last layer. Loss gpudl.ops.cross_entropy.
    optimizer None means Adam at lr 1e-3.
    """

    default_lr = 1e-3

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, channels=(32, 64),
                 hidden: int = 128, dropout: float = 0.0, optimizer=None, scheduler=None):
        owner = type(self).__name__
        in_channels = check_int(owner, "in_channels", in_channels)
        image_size = check_int(owner, "image_size", image_size)
        channels = check_int_tuple(owner, "channels", channels)
        hidden = check_int(owner, "hidden", hidden)
        dropout = check_float(owner, "dropout", dropout, 0.0, 1.0, high_open=True)
        if image_size < 2 ** len(channels):
            raise ValueError(
                f"{owner}: image_size {image_size} is too small for {len(channels)} conv blocks, each of which "
                f"halves it; need image_size >= {2 ** len(channels)}"
            )
        super().__init__(num_classes, optimizer, scheduler)  # checks num_classes and the factories
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        convs, c_in, size = [], in_channels, image_size
        for c_out in channels:
            convs.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, activation="relu"))
            c_in, size = c_out, size // 2
        self.convs = torch.nn.ModuleList(convs)
        self.fc = nn.Linear(c_in * size * size, hidden, activation="relu")
        self.dropout = torch.nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1:] != (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size):
            size = self.hparams.image_size
            raise ValueError(
                f"CNNModule expects images [N, {self.hparams.in_channels}, {size}, {size}], got {tuple(x.shape)}"
            )
        # Channels_last once, here: every convolution and pooling then reads and writes it as it is.
        x = x.contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            x = ops.max_pool2d(conv(x), kernel_size=2)
        x = self.fc(x.flatten(1))  # the head reads (c, h, w) order: one copy of the last, smallest map
        return self.head(self.dropout(x))

    def loss(self, logits, y):
        return ops.cross_entropy(logits, y)

    def predict_labels(self, logits):
        return logits.argmax(-1)

"""Linear regression: y_hat = x W^T + b, fitted by minimizing the mean squared error.

The oldest learning algorithm in the book (Legendre 1805, Gauss 1809); here it is trained by
gradient descent like every other model, so full-batch SGD (batch_size None) is exactly the
textbook gradient descent on the least-squares objective.
"""

from __future__ import annotations

from gpudl import nn
from gpudl.checks import check_int
from gpudl.models._base import RegressionModule


class LinearRegressionModule(RegressionModule):
    """x [N, num_features] -> y_hat [N, 1]; loss gpudl.ops.mse_loss.

    Logs train/loss, val/loss, val/mse, val/r2, test/*; with one feature (the toy line) also
    test/slope and test/intercept, the fitted weight and bias.
    optimizer / scheduler: Hydra partials (`_partial_: true`), called as optimizer(params=...)
    and scheduler(optimizer=...); optimizer None means Adam at lr 0.05.
    """

    default_lr = 0.05

    def __init__(self, num_features: int, optimizer=None, scheduler=None):
        super().__init__(optimizer, scheduler)
        num_features = check_int(type(self).__name__, "num_features", num_features)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x):
        return self.linear(x)

    def on_test_epoch_end(self):
        if self.hparams.num_features == 1:
            self.log("test/slope", self.linear.weight.detach()[0, 0])
            self.log("test/intercept", self.linear.bias.detach()[0])

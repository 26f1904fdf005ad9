"""Logistic regression (Cox 1958): p(y=1 | x) = sigmoid(x W^T + b), fitted by minimizing the
binary cross-entropy. The loss takes the logits, not the probabilities, because
log(sigmoid(z)) computed in one step (softplus) stays finite where sigmoid(z) rounds to 0 or 1.
"""

from __future__ import annotations

from gpudl import nn, ops
from gpudl.checks import check_int
from gpudl.models._base import ClassificationModule


class LogisticRegressionModule(ClassificationModule):
    """x [N, num_features] -> logits [N, 1]; targets y [N, 1] float in {0, 1}.

    Predicts class 1 where the logit is > 0 (p > 0.5). Logs train/loss, val/loss, val/acc,
    val/acc_best, test/loss, test/acc. optimizer None means Adam at lr 0.01.
    """

    default_lr = 0.01

    def __init__(self, num_features: int, optimizer=None, scheduler=None):
        num_features = check_int(type(self).__name__, "num_features", num_features)
        super().__init__(2, optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x):
        return self.linear(x)

    def loss(self, logits, y):
        return ops.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))

    def predict_labels(self, logits):
        return (logits.reshape(-1) > 0).long()

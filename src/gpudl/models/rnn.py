"""An Elman recurrent network (Elman 1990) that reads an image one row at a time.

h_t = tanh(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh): the hidden state is the network's memory of
the rows seen so far, and the class is read off the state after the last row. Digits become
sequences of 8 rows of 8 pixels (MNIST: 28 rows of 28), the classic "sequential MNIST" task.
"""

from __future__ import annotations

from gpudl import nn, ops
from gpudl.checks import check_int
from gpudl.models._base import ClassificationModule


class RNNModule(ClassificationModule):
    """images [N, C, H, W] (read as H steps of C*W features, C*W == input_size) or sequences
    [N, L, input_size] -> logits [N, num_classes].

    A gpudl.nn.RNN (tanh, batch_first) of num_layers layers, hidden_size units, then a linear
    classifier on the last layer's final hidden state. Loss gpudl.ops.cross_entropy.
    optimizer None means Adam at lr 1e-3.
    """

    default_lr = 1e-3

    def __init__(self, input_size: int = 8, hidden_size: int = 128, num_layers: int = 1, num_classes: int = 10,
                 optimizer=None, scheduler=None):
        owner = type(self).__name__
        input_size = check_int(owner, "input_size", input_size)
        hidden_size = check_int(owner, "hidden_size", hidden_size)
        num_layers = check_int(owner, "num_layers", num_layers)
        super().__init__(num_classes, optimizer, scheduler)  # checks num_classes and the factories
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.rnn = nn.RNN(input_size, hidden_size, num_layers=num_layers, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x):
        if x.dim() == 4:  # [N, C, H, W] -> H time steps, each row's pixels of every channel
            x = x.permute(0, 2, 1, 3).flatten(2)
        if x.dim() != 3 or x.shape[-1] != self.hparams.input_size:
            raise ValueError(
                f"RNNModule expects images [N, C, H, W] with C*W == input_size ({self.hparams.input_size}) or "
                f"sequences [N, L, {self.hparams.input_size}], got {tuple(x.shape)}"
            )
        _, h_n = self.rnn(x)  # h_n [num_layers, N, hidden_size]
        return self.head(h_n[-1])

    def loss(self, logits, y):
        return ops.cross_entropy(logits, y)

    def predict_labels(self, logits):
        return logits.argmax(-1)

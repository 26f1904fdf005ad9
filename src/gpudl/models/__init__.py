"""One LightningModule per classic algorithm, each in its own short file named after it."""

from gpudl.models.attention import AttentionModule
from gpudl.models.cnn import CNNModule
from gpudl.models.gan import GANModule
from gpudl.models.gpt import GPTModule
from gpudl.models.linear_regression import LinearRegressionModule
from gpudl.models.logistic_regression import LogisticRegressionModule
from gpudl.models.rnn import RNNModule

__all__ = [
    "LinearRegressionModule",
    "LogisticRegressionModule",
    "CNNModule",
    "RNNModule",
    "AttentionModule",
    "GANModule",
    "GPTModule",
]

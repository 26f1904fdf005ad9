"""Tabular data: scikit-learn's diabetes and breast-cancer sets (bundled in its wheel, no network)
and a generated noisy line. Features [n, num_features] float32; targets [n, 1] float32."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from gpudl.checks import check_float, check_int
from gpudl.data._base import ArrayDataModule, check_labels, load_npz, standardize


def _tensors(X: np.ndarray, y: np.ndarray) -> TensorDataset:
    X, y = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    return TensorDataset(X, y.reshape(-1, 1))


def _features(owner: str, X: np.ndarray, path) -> np.ndarray:
    if X.ndim != 2:
        raise ValueError(
            f"{owner}: data file {os.fspath(path)!r} must hold X of shape [n, num_features], got {X.shape}"
        )
    return X.astype(np.float64)


class DiabetesDataModule(ArrayDataModule):
    """Diabetes progression regression (Efron et al. 2004): X [442, 10], y [442, 1].

    Features and target are standardized with the train split's statistics; `target_mean` and
    `target_std` turn predictions back into the original units (y * std + mean).
    `path`: an optional .npz with X [n, f] and y [n] to use instead of the built-in data.
    """

    def __init__(self, batch_size: int | None = 64, val_fraction=0.15, test_fraction=0.15, split_seed=0,
                 num_workers=0, path: str | None = None):
        super().__init__(batch_size, val_fraction, test_fraction, split_seed, num_workers)
        self.path = path
        if path is None:
            from sklearn.datasets import load_diabetes

            X, y = load_diabetes(return_X_y=True)
        else:
            X, y = load_npz(type(self).__name__, path)
            X = _features(type(self).__name__, X, path)
            if y.size != y.shape[0]:
                raise ValueError(f"{type(self).__name__}: data file {path!r} must hold one target per sample in y, "
                                 f"got shape {y.shape}")
        self._set_data(X.astype(np.float64), y.reshape(-1).astype(np.float64))
        self.num_features = X.shape[1]
        self.target_mean = self.target_std = None

    def _prepare(self, X_train, y_train, X_val, y_val, X_test, y_test):
        (X_train, X_val, X_test), self.feature_mean, self.feature_std = standardize(X_train, X_val, X_test)
        (y_train, y_val, y_test), mean, std = standardize(y_train, y_val, y_test)
        self.target_mean, self.target_std = float(mean.item()), float(std.item())
        return _tensors(X_train, y_train), _tensors(X_val, y_val), _tensors(X_test, y_test)


class ToyLineDataModule(ArrayDataModule):
    """Points on a noisy line, y = slope * x + intercept + noise * N(0, 1), x ~ U[-1, 1].

    X [num_points, 1], y [num_points, 1]. Neither is standardized, so a fitted linear model's
    weight and bias are the slope and intercept themselves. `seed` draws the points.
    """

    def __init__(self, batch_size: int | None = 64, val_fraction=0.15, test_fraction=0.15, split_seed=0,
                 num_workers=0, num_points: int = 100, slope: float = 2.0, intercept: float = 1.0,
                 noise: float = 0.1, seed: int = 0):
        super().__init__(batch_size, val_fraction, test_fraction, split_seed, num_workers)
        owner = type(self).__name__
        check_int(owner, "num_points", num_points, 3)
        check_float(owner, "slope", slope, -np.inf, np.inf, low_open=True, high_open=True)
        check_float(owner, "intercept", intercept, -np.inf, np.inf, low_open=True, high_open=True)
        check_float(owner, "noise", noise, 0.0, np.inf, high_open=True)
        check_int(owner, "seed", seed, 0)
        self.num_points, self.slope, self.intercept = int(num_points), float(slope), float(intercept)
        self.noise, self.seed = float(noise), int(seed)
        rng = np.random.default_rng(self.seed)
        x = rng.uniform(-1.0, 1.0, size=(self.num_points, 1))
        y = self.slope * x[:, 0] + self.intercept + self.noise * rng.standard_normal(self.num_points)
        self._set_data(x, y)
        self.num_features = 1

    def _prepare(self, X_train, y_train, X_val, y_val, X_test, y_test):
        return _tensors(X_train, y_train), _tensors(X_val, y_val), _tensors(X_test, y_test)


class BreastCancerDataModule(ArrayDataModule):
    """Wisconsin diagnostic breast cancer, binary classification: X [569, 30] standardized with the
    train split's statistics, y [569, 1] float in {0, 1}. Splits are stratified by class.
    `path`: an optional .npz with X [n, f] and y [n] in {0, 1} to use instead of the built-in data.
    """

    stratify = True

    def __init__(self, batch_size: int | None = 64, val_fraction=0.15, test_fraction=0.15, split_seed=0,
                 num_workers=0, path: str | None = None):
        super().__init__(batch_size, val_fraction, test_fraction, split_seed, num_workers)
        self.path = path
        if path is None:
            from sklearn.datasets import load_breast_cancer

            X, y = load_breast_cancer(return_X_y=True)
        else:
            X, y = load_npz(type(self).__name__, path)
            X = _features(type(self).__name__, X, path)
            y = check_labels(type(self).__name__, y, f"y in data file {path!r}", num_classes=2)
        self._set_data(X.astype(np.float64), y.astype(np.int64))
        self.num_features = X.shape[1]
        self.num_classes = 2

    def _prepare(self, X_train, y_train, X_val, y_val, X_test, y_test):
        (X_train, X_val, X_test), self.feature_mean, self.feature_std = standardize(X_train, X_val, X_test)
        return _tensors(X_train, y_train), _tensors(X_val, y_val), _tensors(X_test, y_test)

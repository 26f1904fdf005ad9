"""What every gpudl DataModule shares: argument checks, deterministic splits, train-only
standardization, and the three dataloaders.

A subclass reads its raw arrays at construction (`self._set_data(X, y)`; the data sets are small
and in memory, so a missing or malformed data file fails there, loudly) and says how to turn the
split arrays into tensors (`_prepare`); `setup` splits and prepares once.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from gpudl.checks import check_float, check_int


def load_npz(owner: str, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a user's data file: a .npz holding arrays 'X' (samples first) and 'y' (one per sample)."""
    expected = "a .npz file (numpy.savez) holding arrays 'X' (samples first) and 'y' (one entry per sample)"
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: data file {path!r} does not exist; expected {expected}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("it holds a single array, not named arrays")
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise ValueError(f"arrays {missing} are missing (found {sorted(archive.files)})")
            X, y = archive["X"], archive["y"]
    except (OSError, ValueError, EOFError) as err:  # not a zip, truncated, pickled objects, ...
        raise ValueError(f"{owner}: could not read data file {path!r}: {err}; expected {expected}") from err
    if X.ndim < 2 or y.ndim < 1 or X.shape[0] != y.shape[0]:
        raise ValueError(
            f"{owner}: data file {path!r} has X of shape {X.shape} and y of shape {y.shape}; expected X "
            "[n, ...features] and y [n] with the same number of samples n"
        )
    if X.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise ValueError(f"{owner}: data file {path!r} must hold numeric X and y, got dtypes {X.dtype} and {y.dtype}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError(f"{owner}: data file {path!r} holds NaN or infinite values")
    return X, y


def check_labels(owner: str, y: np.ndarray, where: str, num_classes: int | None = None) -> np.ndarray:
    """Class labels must be integers 0..K-1 (one per sample); returns them as int64 [n]."""
    y = np.asarray(y).reshape(y.shape[0], -1)
    if y.shape[1] != 1 or not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0:
        raise ValueError(f"{owner}: {where} must hold one non-negative integer class label per sample, got shape {y.shape}")
    y = y[:, 0].astype(np.int64)
    if num_classes is not None and y.max() >= num_classes:
        raise ValueError(f"{owner}: {where} holds label {y.max()}, expected labels in 0..{num_classes - 1}")
    return y


class ArrayDataModule(L.LightningDataModule):
    """An in-memory data set split into train/val/test.

    Args:
        batch_size: samples per batch; None puts each whole split in one batch (full-batch
            gradient descent).
        val_fraction, test_fraction: shares of the data held out; both in (0, 1), sum < 1.
        split_seed: seeds the split (stratified for classification) and the train shuffling.
        num_workers: DataLoader worker processes.
    """

    stratify: bool = False  # classification subclasses keep class proportions in every split

    def __init__(self, batch_size: int | None = 64, val_fraction=0.15, test_fraction=0.15, split_seed=0, num_workers=0):
        super().__init__()
        owner = type(self).__name__
        check_int(owner, "batch_size", batch_size, 1, allow_none=True, none_means="full batch")
        check_float(owner, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"{owner}: val_fraction + test_fraction must be < 1 to leave training data, got "
                f"{val_fraction} + {test_fraction}"
            )
        check_int(owner, "split_seed", split_seed, 0)
        check_int(owner, "num_workers", num_workers, 0)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.split_seed, self.num_workers = int(split_seed), int(num_workers)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _set_data(self, X: np.ndarray, y: np.ndarray) -> None:
        self._X, self._y = X, y

    def _prepare(self, X_train, y_train, X_val, y_val, X_test, y_test) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        raise NotImplementedError

    # ------------------------------------------------------------------ splitting
    def _strata(self, y: np.ndarray, n_small: int) -> np.ndarray | None:
        """Class labels, or for regression the target's quantile bin: splits stratified by binned
        target keep each split's target distribution alike, which steadies small test sets (the
        diabetes test set has 67 samples; over split seeds its test R^2 varies much less)."""
        if self.stratify:
            return y
        bins = min(10, n_small, y.shape[0] // 4)
        if bins < 2:
            return None
        return np.digitize(y, np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1]))

    def _split(self, X: np.ndarray, y: np.ndarray):
        """Deterministic train/val/test split from split_seed, stratified by class (or binned target)."""
        owner = type(self).__name__
        n = X.shape[0]
        n_test = int(np.ceil(self.test_fraction * n))
        n_val = int(np.ceil(self.val_fraction * n))
        if n - n_test - n_val < 1:
            raise ValueError(f"{owner}: {n} samples are too few for val_fraction={self.val_fraction}, test_fraction={self.test_fraction}")
        strata = self._strata(y, min(n_test, n_val))
        index = np.arange(n)

        def split(strata):
            rest, test = train_test_split(index, test_size=n_test, random_state=self.split_seed, stratify=strata)
            train, val = train_test_split(
                rest, test_size=n_val, random_state=self.split_seed + 1, stratify=None if strata is None else strata[rest]
            )
            return train, val, test

        try:
            train, val, test = split(strata)
        except ValueError as err:  # e.g. a class with a single sample cannot be stratified
            if self.stratify:
                raise ValueError(f"{owner}: cannot split {n} samples into train/val/test stratified by class: {err}") from err
            train, val, test = split(None)  # binned regression targets: stratifying is only a nicety
        return X[train], y[train], X[val], y[val], X[test], y[test]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # idempotent: Lightning calls setup once per stage
            return
        self.train_set, self.val_set, self.test_set = self._prepare(*self._split(self._X, self._y))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        # Seeded, so the shuffling order of a run depends on split_seed only.
        generator = torch.Generator().manual_seed(self.split_seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=len(dataset) if self.batch_size is None else self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)


def standardize(train: np.ndarray, *others: np.ndarray, axis=0):
    """Scale every array by the TRAIN split's mean and std (constant columns keep std 1, so no
    division by zero: e.g. the always-blank corner pixels of digits). Returns (arrays, mean, std)."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    std = np.where(std > 1e-12, std, 1.0)
    return [(a - mean) / std for a in (train, *others)], mean, std

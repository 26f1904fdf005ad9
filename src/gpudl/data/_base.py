"""What every gpudl DataModule shares: argument checks, deterministic splits, train-only
standardization, and the three loaders.

A subclass reads its raw arrays at construction (`self._set_data(X, y)`; the data sets are small
and in memory, so a missing or malformed data file fails there, loudly) and says how to turn the
split arrays into tensors (`_prepare`); `setup` splits and prepares once.

The data sets fit in memory many times over, so a split that is a TensorDataset is served by a
`TensorLoader`: its tensors move to the training device once, and each batch is one gather by
index from a seeded per-epoch permutation (no per-sample `__getitem__`, no collate, no
host-to-device copy per step). Other datasets, or num_workers > 0, get a torch DataLoader.
"""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset

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
        raise ValueError(
            f"{owner}: {where} must hold one non-negative integer class label per sample, got shape {y.shape}"
        )
    y = y[:, 0].astype(np.int64)
    if num_classes is not None and y.max() >= num_classes:
        raise ValueError(f"{owner}: {where} holds label {y.max()}, expected labels in 0..{num_classes - 1}")
    return y


def _epoch_seed(seed: int, epoch: int) -> int:
    # One generator seed per (loader seed, epoch): an epoch's order depends on nothing else, so a
    # resumed run draws the same orders as an uninterrupted one.
    return (seed * 1_000_003 + epoch) % (1 << 63)


class TensorLoader:
    """Batches of equal-length tensors [n, ...] served by index on the tensors' device.

    Each epoch: `torch.randperm(n)` from a generator seeded with (seed, epoch) when shuffling (else
    0..n-1), cut into batches of `batch_size` (the last one shorter), one `index_select` per tensor
    per batch. Under data parallelism (`num_replicas` > 1) every process takes the same shard as
    torch's DistributedSampler would: the order padded with its first indices to a multiple of
    num_replicas, then every num_replicas-th index from `rank`, so all processes run the same
    number of steps.

    The epoch is set by `set_epoch` (Lightning calls it through `sampler.set_epoch` before every
    training epoch, as for a DistributedSampler); without it, each new iteration starts the next epoch.
    """

    batch_sampler = None  # what Lightning looks for next to `sampler` (to tell a shuffled loader)

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int | None, shuffle: bool = False,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError(f"TensorLoader: tensors must share their first dimension, got shapes "
                             f"{[tuple(t.shape) for t in tensors]}")
        check_int("TensorLoader", "batch_size", batch_size, 1, allow_none=True, none_means="full batch")
        check_int("TensorLoader", "num_replicas", num_replicas, 1)
        check_int("TensorLoader", "rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"TensorLoader: rank must be < num_replicas ({num_replicas}), got {rank}")
        self.tensors, self.shuffle, self.seed = tuple(tensors), bool(shuffle), int(seed)
        self.num_replicas, self.rank, self.epoch = int(num_replicas), int(rank), 0
        n = tensors[0].shape[0]
        self.num_samples = -(-n // self.num_replicas)  # per process, padded as DistributedSampler pads
        self.batch_size = self.num_samples if batch_size is None else int(batch_size)
        if self.shuffle:
            self.sampler = self  # Lightning's per-epoch `loader.sampler.set_epoch(epoch)` reaches set_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size) if self.num_samples else 0

    def _order(self, device: torch.device) -> torch.Tensor | None:
        """This process's indices for this epoch, on `device`; None when they are 0..n-1 in order."""
        n = self.tensors[0].shape[0]
        # A whole split in one batch: the order does not change the batch's mean loss, so keep it.
        whole = self.batch_size >= n and self.num_replicas == 1
        if self.shuffle and not whole:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator)
        elif self.num_replicas > 1:
            order = torch.arange(n)
        else:
            return None
        if self.num_replicas > 1:
            total = self.num_samples * self.num_replicas
            order = torch.cat([order, order[: total - n]]) if total > n else order
            order = order[self.rank : total : self.num_replicas]
        return order.to(device)

    def __iter__(self):
        order = self._order(self.tensors[0].device)
        self.epoch += 1
        for start in range(0, self.num_samples, self.batch_size):
            if order is None:
                yield tuple(t[start : start + self.batch_size] for t in self.tensors)
            else:
                index = order[start : start + self.batch_size]
                yield tuple(t.index_select(0, index) for t in self.tensors)


class ArrayDataModule(L.LightningDataModule):
    """An in-memory data set split into train/val/test.

    Args:
        batch_size: samples per batch; None puts each whole split in one batch (full-batch
            gradient descent).
        val_fraction, test_fraction: shares of the data held out; both in (0, 1), sum < 1.
        split_seed: seeds the split (stratified for classification) and the train shuffling.
        num_workers: 0 (the default) serves TensorDataset splits from the training device by
            index (TensorLoader); > 0 uses a torch DataLoader with that many worker processes.
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

    def _prepare(self, X_train, y_train, X_val, y_val, X_test, y_test) -> tuple[Dataset, Dataset, Dataset]:
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
            raise ValueError(f"{owner}: {n} samples are too few for val_fraction={self.val_fraction}, "
                             f"test_fraction={self.test_fraction}")
        strata = self._strata(y, min(n_test, n_val))
        index = np.arange(n)

        def split(strata):
            rest, test = train_test_split(index, test_size=n_test, random_state=self.split_seed, stratify=strata)
            train, val = train_test_split(
                rest, test_size=n_val, random_state=self.split_seed + 1,
                stratify=None if strata is None else strata[rest],
            )
            return train, val, test

        try:
            train, val, test = split(strata)
        except ValueError as err:  # e.g. a class with a single sample cannot be stratified
            if self.stratify:
                raise ValueError(
                    f"{owner}: cannot split {n} samples into train/val/test stratified by class: {err}"
                ) from err
            train, val, test = split(None)  # binned regression targets: stratifying is only a nicety
        return X[train], y[train], X[val], y[val], X[test], y[test]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # idempotent: Lightning calls setup once per stage
            return
        self.train_set, self.val_set, self.test_set = self._prepare(*self._split(self._X, self._y))

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset | None, shuffle: bool) -> TensorLoader | DataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.overfit_batches:
            shuffle = False  # overfitting repeats the same batches
        if isinstance(dataset, TensorDataset) and self.num_workers == 0:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            return TensorLoader(self._on_device(dataset, device), self.batch_size, shuffle=shuffle,
                                seed=self.split_seed, num_replicas=replicas, rank=rank)
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

    def _on_device(self, dataset: TensorDataset, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The dataset's tensors on `device`, copied there once per split and device."""
        cache = self.__dict__.setdefault("_device_tensors", {})
        key = (id(dataset), str(device))
        if key not in cache:
            cache[key] = tuple(t.to(device) for t in dataset.tensors)
        return cache[key]

    def train_dataloader(self) -> TensorLoader | DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> TensorLoader | DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> TensorLoader | DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)


def standardize(train: np.ndarray, *others: np.ndarray, axis=0):
    """Scale every array by the TRAIN split's mean and std (constant columns keep std 1, so no
    division by zero: e.g. the always-blank corner pixels of digits). Returns (arrays, mean, std)."""
    mean = train.mean(axis=axis, keepdims=True)
    std = train.std(axis=axis, keepdims=True)
    std = np.where(std > 1e-12, std, 1.0)
    return [(a - mean) / std for a in (train, *others)], mean, std

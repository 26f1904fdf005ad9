"""Character-level language-modelling data: a text split in order into train/val(/test), a
character vocabulary, random training windows and consecutive evaluation windows.

The built-in corpus ships with every CPython, no download: the text of `pydoc_data.topics`
(the help topics of `help()`), its values joined in sorted key order. Its exact length depends
on the Python version (464,970 characters and 103 distinct ones on CPython 3.11.7).
"""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from gpudl.checks import check_float, check_int


def pydoc_topics_text() -> str:
    """The text of pydoc_data.topics: every topic's text, in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def read_text(owner: str, path: str | os.PathLike) -> str:
    """A user's UTF-8 text file, with errors that name the path and what was expected."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: text file {path!r} does not exist; expected a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{owner}: text file {path!r} is not valid UTF-8 ({err}); expected a UTF-8 text file") from err
    if not text:
        raise ValueError(f"{owner}: text file {path!r} is empty; expected a UTF-8 text file with some text")
    return text


class Windows(Dataset):
    """Windows of a token sequence: item i = (tokens[s : s+T], tokens[s+1 : s+T+1]) with s = i * stride."""

    def __init__(self, tokens: torch.Tensor, context_length: int, stride: int):
        self.tokens, self.context_length, self.stride = tokens, context_length, stride
        self.count = (tokens.numel() - 1 - context_length) // stride + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        s = i * self.stride
        chunk = self.tokens[s:s + self.context_length + 1]
        return chunk[:-1], chunk[1:]


class TextDataModule(L.LightningDataModule):
    """Characters of a text as int64 ids (id i = the i-th character of `vocab`, sorted), split in
    order: the first (1 - val_fraction - test_fraction) for training, then validation, then test.

    Args:
        path: a UTF-8 text file to use instead of the built-in pydoc_data.topics text.
        context_length: characters per window (the model sees at most this many).
        batch_size: windows per batch.
        samples_per_epoch: training windows drawn per epoch, at uniformly random offsets (with
            replacement), from a generator seeded by split_seed (and the epoch, through
            gpudl.callbacks.RNGStateCheckpoint, so a resumed run draws the same windows).
        val_fraction: the held-out share after the training text.
        test_fraction: a share at the very end for testing; 0 tests on the validation text.
        split_seed: seeds the training windows.
        num_workers: DataLoader worker processes.

    Validation and test read consecutive non-overlapping windows: every held-out character but
    the last few (less than one window) is predicted once, from 0..T-1 characters of context.
    """

    def __init__(self, path: str | None = None, context_length: int = 128, batch_size: int = 64,
                 samples_per_epoch: int = 8000, val_fraction: float = 0.1, test_fraction: float = 0.0,
                 split_seed: int = 0, num_workers: int = 0):
        super().__init__()
        owner = type(self).__name__
        self.context_length = check_int(owner, "context_length", context_length)
        self.batch_size = check_int(owner, "batch_size", batch_size)
        self.samples_per_epoch = check_int(owner, "samples_per_epoch", samples_per_epoch)
        self.val_fraction = check_float(owner, "val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.test_fraction = check_float(owner, "test_fraction", test_fraction, 0.0, 1.0, high_open=True)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"{owner}: val_fraction + test_fraction must be < 1 to leave training text, got "
                             f"{val_fraction} + {test_fraction}")
        self.split_seed = check_int(owner, "split_seed", split_seed, 0)
        self.num_workers = check_int(owner, "num_workers", num_workers, 0)
        self.path = None if path is None else os.fspath(path)

        text = pydoc_topics_text() if path is None else read_text(owner, path)
        self.vocab = "".join(sorted(set(text)))
        if len(self.vocab) < 2:
            raise ValueError(f"{owner}: the text holds {len(self.vocab)} distinct character(s); a language model "
                             "needs at least 2")
        self.vocab_size = len(self.vocab)
        self.num_chars = len(text)
        n_val, n_test = round(val_fraction * len(text)), round(test_fraction * len(text))
        n_train = len(text) - n_val - n_test
        where = f"text file {self.path!r}" if path is not None else "the pydoc_data.topics text"
        parts = {"training": n_train, "validation": n_val}
        if test_fraction > 0:
            parts["test"] = n_test
        for name, n in parts.items():
            if n < self.context_length + 1:
                raise ValueError(
                    f"{owner}: {where} has {len(text)} characters, leaving {n} for {name}; each split needs at least "
                    f"context_length + 1 = {self.context_length + 1}: use a longer text or a smaller context_length"
                )
        ids = self.encode(text)
        self.train_tokens = ids[:n_train]
        self.val_tokens = ids[n_train:n_train + n_val]
        self.test_tokens = ids[n_train + n_val:] if n_test else self.val_tokens

    # ------------------------------------------------------------------ vocabulary
    def encode(self, text: str) -> torch.Tensor:
        """A string -> int64 ids [len(text)]; a character outside the vocabulary is a ValueError."""
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ValueError(f"{type(self).__name__}: characters {unknown[:10]!r} are not in the vocabulary")
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        windows = Windows(self.train_tokens, self.context_length, stride=1)
        generator = torch.Generator().manual_seed(self.split_seed)
        sampler = RandomSampler(windows, replacement=True, num_samples=self.samples_per_epoch, generator=generator)
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler, generator=generator,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, tokens: torch.Tensor) -> DataLoader:
        windows = Windows(tokens, self.context_length, stride=self.context_length)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_tokens)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_tokens)

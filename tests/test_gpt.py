"""The character-level GPT (gpudl.models.GPTModule) and its data (gpudl.data.TextDataModule):
shapes, causality, weight tying, learning on both backends, generation, the data splits and
errors, and experiment=gpt_chars through train() and scripts/sample.py."""

from __future__ import annotations

import functools
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpudl
from gpudl.data import TextDataModule
from gpudl.data.text import pydoc_topics_text
from gpudl.models import GPTModule

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=11, context_length=8, d_model=16, num_heads=2, num_layers=1)


def _tiny(**kwargs):
    torch.manual_seed(0)
    return GPTModule(**{**TINY, **kwargs}, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))


# --------------------------------------------------------------------------- model
def test_forward_backward_shapes():
    model = _tiny()
    x = torch.randint(0, 11, (3, 8))
    logits = model(x)
    assert logits.shape == (3, 8, 11)
    model.loss(logits, torch.randint(0, 11, (3, 8))).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(x[:, :5]).shape == (3, 5, 11)  # shorter than the context is fine


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_position_t_sees_no_later_input(backend, device):
    model = _tiny().to(device).eval()
    x = torch.randint(0, 11, (2, 8), device=device)
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    with gpudl.use_backend(backend):
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4  # the later positions do see the change


def test_output_head_is_the_token_embedding():
    model = _tiny()
    names = [name for name, _ in model.named_parameters()]
    assert not any("head" in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for _, p in model.named_parameters())
    # A token absent from the input still gets a gradient in tok_emb: through the tied output head.
    x, y = torch.zeros(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64)
    model.loss(model(x), y).backward()
    assert model.tok_emb.weight.grad[5].abs().sum() > 0
    # Changing an embedding row changes that token's logit at every position.
    with torch.no_grad():
        before = model(x)
        model.tok_emb.weight[7] += 1.0
        after = model(x)
    assert (after[..., 7] - before[..., 7]).abs().min() > 0 and torch.equal(after[..., 3], before[..., 3])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_falls_in_a_few_steps(backend, device, launches):
    model = _tiny().to(device)
    opt = model.configure_optimizers()["optimizer"]
    x = torch.randint(0, 11, (4, 8), device=device)
    y = torch.roll(x, -1, dims=1)  # memorize a fixed batch
    losses = []
    with gpudl.use_backend(backend):
        for _ in range(6):
            loss = model.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    if backend == "triton":
        assert {"_attn_fwd", "_ln_fwd_kernel", "_matmul_kernel"} <= set(launches.kernels()), launches.kernels()
    else:
        assert len(launches) == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_step_compiles_fullgraph_and_matches_eager(backend, device):
    """As tests/test_compile.py for the other models: forward + loss in one graph (aot_eager also
    traces the backward), eager's loss and gradients, at most one recompilation for a new batch size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _tiny().to(device)
    step = lambda x, y: model.loss(model(x), y)  # noqa: E731
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    try:
        with gpudl.use_backend(backend):
            for n in (4, 3):
                x, y = torch.randint(0, 11, (n, 8), device=device), torch.randint(0, 11, (n, 8), device=device)
                model.zero_grad()
                want = step(x, y)
                want.backward()
                want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
                model.zero_grad()
                got = compiled(x, y)
                got.backward()
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                for k, p in model.named_parameters():
                    torch.testing.assert_close(p.grad, want_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count <= 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=1), "vocab_size"),
        (dict(context_length=0), "context_length"),
        (dict(d_model=10, num_heads=4), "num_heads 4 must divide d_model 10"),
        (dict(num_layers=0), "num_layers"),
        (dict(mlp_dim=0), "mlp_dim"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_hyperparameters_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTModule(**{**TINY, **kwargs})


def test_bad_input_is_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="int64 token ids"):
        model(torch.rand(2, 8))
    with pytest.raises(ValueError, match="context_length=8"):
        model(torch.zeros(2, 9, dtype=torch.int64))


def test_generate_lengths_seeding_and_greedy():
    model = _tiny()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    greedy = model.generate(prompt, 10, temperature=0.0)
    top1 = model.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)
    assert model.training  # generation leaves the mode as it found it
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)


# --------------------------------------------------------------------------- data
def test_builtin_text_splits_in_order():
    dm = TextDataModule(context_length=16, batch_size=4, samples_per_epoch=12)
    text = pydoc_topics_text()
    assert dm.num_chars == len(text) > 400_000 and dm.vocab == "".join(sorted(set(text))) and dm.vocab_size == 103
    n_val = round(0.1 * len(text))
    assert dm.decode(dm.train_tokens[:50]) == text[:50]
    assert dm.decode(dm.val_tokens) == text[-n_val:] and dm.test_tokens is dm.val_tokens
    batches = list(dm.train_dataloader())
    assert sum(x.shape[0] for x, _ in batches) == 12
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    # Validation: consecutive windows, each character predicted once.
    vx, vy = next(iter(dm.val_dataloader()))
    assert torch.equal(vx[1], dm.val_tokens[16:32]) and torch.equal(vy[0], dm.val_tokens[1:17])
    assert len(dm.val_dataloader().dataset) == (n_val - 1 - 16) // 16 + 1


def test_baselines_quoted_in_the_readme():
    """Unigram and bigram models with add-one smoothing, fit on the training text, scored on the
    validation text: the 4.67 and 3.35 bits per character the README compares the GPT with."""
    dm = TextDataModule()
    v = dm.vocab_size
    train, val = dm.train_tokens, dm.val_tokens
    counts = torch.bincount(train, minlength=v).double()
    unigram = -torch.log2((counts[val] + 1) / (counts.sum() + v)).mean()
    pairs = torch.bincount(train[:-1] * v + train[1:], minlength=v * v).double().view(v, v)
    bigram = -torch.log2((pairs[val[:-1], val[1:]] + 1) / (pairs.sum(1)[val[:-1]] + v)).mean()
    assert round(unigram.item(), 2) == 4.67 and round(bigram.item(), 2) == 3.35


def test_training_windows_are_seeded(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 30, encoding="utf-8")

    def windows(**kwargs):
        dm = TextDataModule(str(path), context_length=4, batch_size=3, samples_per_epoch=6, **kwargs)
        return [x for x, _ in dm.train_dataloader()]

    first, again, other = windows(), windows(), windows(split_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_test_fraction_carves_a_test_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(1000)), encoding="utf-8")
    dm = TextDataModule(str(path), context_length=8, val_fraction=0.1, test_fraction=0.2)
    assert (len(dm.train_tokens), len(dm.val_tokens), len(dm.test_tokens)) == (700, 100, 200)
    assert dm.decode(dm.test_tokens[:3]) == "".join(chr(97 + i % 26) for i in range(800, 803))


def test_user_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextDataModule(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        TextDataModule(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ab\xff\xfe" * 100)
    with pytest.raises(ValueError, match="not valid UTF-8"):
        TextDataModule(str(binary))
    short = tmp_path / "short.txt"
    short.write_text("hello world, " * 20)  # 260 characters: 26 for validation
    with pytest.raises(ValueError, match="leaving 26 for validation.*context_length \\+ 1 = 129"):
        TextDataModule(str(short), context_length=128)
    one = tmp_path / "one.txt"
    one.write_text("a" * 500)
    with pytest.raises(ValueError, match="1 distinct"):
        TextDataModule(str(one), context_length=8)


@pytest.mark.parametrize("kwargs, key", [(dict(context_length=0), "context_length"), (dict(batch_size=0), "batch_size"),
                                         (dict(samples_per_epoch=0), "samples_per_epoch"),
                                         (dict(val_fraction=0.0), "val_fraction"),
                                         (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction")])
def test_arguments_are_validated(kwargs, key):
    with pytest.raises(ValueError, match=key):
        TextDataModule(**kwargs)


# --------------------------------------------------------------------------- experiment and sampling
FAST = ["logger=none", "trainer.max_epochs=2", "data.samples_per_epoch=32", "data.batch_size=16",
        "data.context_length=32", "model.d_model=32", "model.num_layers=1", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    pytest.importorskip("hydra", reason="needs hydra-core")
    from gpudl.train import train
    from gpudl.utils import compose

    out = tmp_path_factory.mktemp("gpt_chars")
    metrics = train(compose(["experiment=gpt_chars", *FAST], output_dir=out))
    return out, metrics


def test_gpt_chars_trains_through_train(trained_run):
    out, metrics = trained_run
    for key in ("train/loss", "val/loss", "val/bpc", "val/bpc_best", "test/bpc", "test/loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/bpc"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-5)
    assert metrics["val/bpc"] < math.log2(103)  # two short epochs already beat uniform guessing
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["vocab"] == "".join(sorted(set(pydoc_topics_text())))
    assert ckpt["val_bpc_best"] == pytest.approx(metrics["val/bpc_best"])


def test_vocab_size_must_fit_a_user_text(tmp_path):
    pytest.importorskip("hydra", reason="needs hydra-core")
    from gpudl.train import ConfigError, train
    from gpudl.utils import compose

    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 100, encoding="utf-8")
    with pytest.raises(ConfigError, match="model.vocab_size=10"):
        train(compose(["experiment=gpt_chars", f"data.path={path}", *FAST], output_dir=tmp_path / "run"))


def test_sample_script_prints_generated_text(trained_run, capsys):
    out, _ = trained_run
    ckpt = f"ckpt_path={out}/checkpoints/last.ckpt"
    args = [ckpt, "prompt=The ", "length=40", "temperature=0.8", "top_k=10", "seed=1"]
    cli = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), *args], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("The ") and len(cli.stdout.rstrip("\n")) >= 44

    # In this process (each interpreter start costs seconds): seeded, and the bad arguments.
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "scripts" / "sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(args) == 0 and capsys.readouterr().out == cli.stdout  # seeded: the same text
    for bad, message in [("prompt=\u2603", "not in the model's vocabulary"), ("lenght=5", "lenght"),
                         ("top_k=0", "top_k must be >= 1"), ("temperature=hot", "temperature must be a number")]:
        assert script.main([ckpt, bad]) == 2
        assert message in capsys.readouterr().err
    assert script.main([f"ckpt_path={out}/nope.ckpt"]) == 2 and "nope.ckpt does not exist" in capsys.readouterr().err
    assert script.main([f"ckpt_path={out}/config.yaml"]) == 2 and "could not load" in capsys.readouterr().err


def test_interrupted_then_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """As tests/test_resume.py for the CNN: the random training windows of a resumed run are the
    ones the uninterrupted run drew (RNGStateCheckpoint reseeds the RandomSampler per epoch), so
    every metric matches bit for bit, val/bpc_best included."""
    pytest.importorskip("hydra", reason="needs hydra-core")
    from helpers import add_callback
    from lightning.pytorch.callbacks import Callback

    from gpudl.train import train
    from gpudl.utils import compose

    args = ["experiment=gpt_chars", *FAST, "trainer.max_epochs=3", "trainer.deterministic=true", "seed=3"]
    alone = train(compose(args, output_dir=tmp_path / "alone"))

    class Stop(Exception):
        pass

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise Stop

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        add_callback(patch, StopAfterFirstEpoch())
        with pytest.raises(Stop):
            train(compose(args, output_dir=out))
    resumed = train(compose([*args, "ckpt_path=last"], output_dir=out))
    assert resumed == alone

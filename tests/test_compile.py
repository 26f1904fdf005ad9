"""torch.compile over every model's training step, on both backends.

Each model's forward + loss compiles with `fullgraph=True` (any graph break is an error) through
`aot_eager`, which also traces the backward (AOT autograd): the Triton kernels appear in the
graph as `torch.ops.gpudl` custom ops with their fake implementations. The compiled step gives
eager's loss and parameter gradients, and a ragged last batch causes at most one recompilation
(Dynamo then marks the batch dimension dynamic). Inductor itself runs in the GPU tests.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import gpudl
from gpudl import ops
from gpudl.models import (
    AttentionModule,
    CNNModule,
    GANModule,
    LinearRegressionModule,
    LogisticRegressionModule,
    RNNModule,
)

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def _classifier_batch(n, device):
    return torch.rand(n, 1, 8, 8, device=device), torch.randint(0, 10, (n,), device=device)


def _supervised(make_model, make_batch):
    def setup(device):
        model = make_model().to(device)
        return model, lambda x, y: model.loss(model(x), y), make_batch
    return setup


def _gan_generator_step(device):
    model = GANModule(image_shape=(1, 8, 8), latent_dim=8, hidden=32).to(device)
    step = lambda z, _: ops.gan_generator_loss(model.discriminator(model.generator(z)))  # noqa: E731
    return model, step, lambda n, dev: (torch.randn(n, 8, device=dev), None)


def _gan_discriminator_step(device):
    model = GANModule(image_shape=(1, 8, 8), latent_dim=8, hidden=32).to(device)

    def step(real, z):
        fake = model.generator(z).detach()
        return ops.gan_discriminator_loss(model.discriminator(real), model.discriminator(fake))

    return model, step, lambda n, dev: (torch.rand(n, 1, 8, 8, device=dev), torch.randn(n, 8, device=dev))


MODELS = {
    "linear_regression": _supervised(lambda: LinearRegressionModule(10, ADAM),
                                     lambda n, d: (torch.randn(n, 10, device=d), torch.randn(n, 1, device=d))),
    "logistic_regression": _supervised(lambda: LogisticRegressionModule(30, ADAM),
                                       lambda n, d: (torch.randn(n, 30, device=d),
                                                     torch.randint(0, 2, (n, 1), device=d).float())),
    # Narrow widths, one block: a graph break or a wrong gradient shows at any width, and the
    # interpreter's time grows with the programs that width adds.
    "cnn": _supervised(lambda: CNNModule(channels=(8, 16), hidden=32, optimizer=ADAM), _classifier_batch),
    "rnn": _supervised(lambda: RNNModule(hidden_size=16, optimizer=ADAM), _classifier_batch),
    "attention": _supervised(lambda: AttentionModule(embed_dim=32, num_heads=2, num_layers=1, mlp_dim=64,
                                                     optimizer=ADAM), _classifier_batch),
    "gan_generator": _gan_generator_step,
    "gan_discriminator": _gan_discriminator_step,
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # The steps of different models share code objects: start each test with an empty cache.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_and_grads(model, step, batch):
    model.zero_grad(set_to_none=True)
    loss = step(*batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_compiles_fullgraph_and_matches_eager(name, backend, device):
    torch.manual_seed(0)
    model, step, make_batch = MODELS[name](device)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    # Ragged last batches; two sizes suffice on the (interpreted, slower) triton backend.
    sizes = (8, 5, 3) if backend == "torch" else (8, 5)
    with gpudl.use_backend(backend):
        for n in sizes:
            batch = make_batch(n, device)
            want_loss, want_grads = _loss_and_grads(model, step, batch)
            got_loss, got_grads = _loss_and_grads(model, compiled, batch)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
            assert got_grads.keys() == want_grads.keys()
            for key in want_grads:
                torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-6, msg=key)
    # One graph for the first batch size, one more (dynamic batch) for the ragged ones.
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for batch sizes {sizes}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor over the Triton kernels needs a CUDA device")
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_compiles_with_inductor_on_the_kernels(name):
    """On a GPU the kernels are triton_ops: Inductor traces into their launches (wrap_triton) and
    compiles the graph around them; the step still gives eager's loss and gradients."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, step, make_batch = MODELS[name](device)
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    with gpudl.use_backend("triton"):
        for n in (64, 48):
            batch = make_batch(n, device)
            want_loss, want_grads = _loss_and_grads(model, step, batch)
            got_loss, got_grads = _loss_and_grads(model, compiled, batch)
            torch.testing.assert_close(got_loss, want_loss, rtol=1e-4, atol=1e-5)
            for key in want_grads:
                torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-3, atol=1e-5, msg=key)

"""Whole-model training steps on gpudl's kernels against PyTorch, side by side, in one run.

    python scripts/bench_models.py [--experiments gpt cnn ...] [--iters 20] [--warmup 5] [--out DIR]
    python scripts/bench_models.py --smoke [--out DIR]   # CPU: tiny configs through the Triton interpreter

For each experiment in EXPERIMENTS, one training step (forward, loss, backward, optimizer step;
the GAN: a discriminator step and a generator step) is timed in three variants, each on a fresh
model from the same seed and the same batches:

    triton          kernels.backend=triton: every gpudl op on our Triton kernels
    torch           kernels.backend=torch: the same model on the PyTorch reference ops
    torch+compile   backend torch, the model torch.compile'd as train() does (compile.enabled=true)

On a GPU: the GPU-sized configs below, forward and loss under bf16 autocast (precision=bf16-mixed;
fp16 on GPUs without bf16); median ms/step over --iters after --warmup steps, tokens or images per
second, peak allocated memory of the timed steps (after the warm-up, so autotuning and compilation
are not in it), and each variant's speed relative to `torch` (> 1: faster).
--smoke on a CPU: the tiny configs, fp32, the interpreter, compile through aot_eager; its
timings say nothing about a GPU, it checks that every experiment's step runs in every variant
and that the first step's loss agrees across variants.

Writes a Markdown table to stdout and, with --out DIR, DIR/results.json and DIR/results.md.
Builds the models from their classes (no Hydra, OmegaConf, W&B or mlxtend: the GPU machine may
lack them). To add an experiment, add an entry to EXPERIMENTS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import gpudl  # noqa: E402
from gpudl import ops  # noqa: E402
from gpudl.models import AttentionModule, CNNModule, GANModule, GPTModule, RNNModule  # noqa: E402

VARIANTS = ("triton", "torch", "torch+compile")


# --------------------------------------------------------------------------- steps
def supervised_step(model, optimizers, batch, autocast):
    (opt,) = optimizers
    x, y = batch
    with autocast():
        loss = model.loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def gan_step(model, optimizers, batch, autocast):
    """GANModule.training_step without a Trainer: D on real vs detached fakes, then G."""
    opt_g, opt_d = optimizers
    real, z = batch
    with autocast():
        fake = model.generator(z)
        d_loss = ops.gan_discriminator_loss(model.discriminator(real), model.discriminator(fake.detach()))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    with autocast():
        g_loss = ops.gan_generator_loss(model.discriminator(fake))
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return (d_loss + g_loss).detach()


# --------------------------------------------------------------------------- the experiments
class Experiment(NamedTuple):
    """build(smoke) -> model; batch(smoke, device, generator) -> batch tuple; items(batch) -> tokens or
    images per step (`unit`); step(model, optimizers, batch, autocast) -> loss; config(smoke) -> a
    one-line description."""

    build: Callable[[bool], torch.nn.Module]
    batch: Callable[[bool, torch.device, torch.Generator], tuple]
    unit: str
    items: Callable[[tuple], int]
    config: Callable[[bool], str]
    step: Callable = supervised_step


def _images(n_gpu, n_smoke, size_gpu, size_smoke):
    def make(smoke, device, gen):
        n, s = (n_smoke, size_smoke) if smoke else (n_gpu, size_gpu)
        x = torch.rand(n, 1, s, s, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        return x.to(device), y.to(device)
    return make


def _tokens(smoke, device, gen):
    n, t, v = (2, 16, 11) if smoke else (16, 1024, 103)
    x = torch.randint(0, v, (n, t + 1), generator=gen)
    return x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)


def _gan_batch(smoke, device, gen):
    n, s, latent = (4, 8, 8) if smoke else (512, 28, 64)
    return torch.rand(n, 1, s, s, generator=gen).to(device), torch.randn(n, latent, generator=gen).to(device)


def _dcgan_batch(smoke, device, gen):
    n, c, s, latent = (4, 1, 8, 8) if smoke else (128, 3, 64, 100)
    return torch.rand(n, c, s, s, generator=gen).to(device), torch.randn(n, latent, generator=gen).to(device)


GPT_GPU = dict(vocab_size=103, context_length=1024, d_model=768, num_heads=12, num_layers=12)
GPT_SMOKE = dict(vocab_size=11, context_length=16, d_model=16, num_heads=2, num_layers=1)

EXPERIMENTS: dict[str, Experiment] = {
    "cnn": Experiment(
        build=lambda smoke: CNNModule(image_size=8 if smoke else 28, channels=(4, 8) if smoke else (32, 64),
                                      hidden=16 if smoke else 128),
        batch=_images(512, 4, 28, 8), unit="images", items=lambda b: b[0].shape[0],
        config=lambda smoke: "batch 4, 8x8, channels (4, 8)" if smoke
        else "batch 512, 28x28, channels (32, 64), hidden 128"),
    "rnn": Experiment(
        build=lambda smoke: RNNModule(input_size=8 if smoke else 28, hidden_size=8 if smoke else 256),
        batch=_images(512, 4, 28, 8), unit="images", items=lambda b: b[0].shape[0],
        config=lambda smoke: "batch 4, 8 rows of 8, hidden 8" if smoke else "batch 512, 28 rows of 28, hidden 256"),
    "attention": Experiment(
        build=lambda smoke: AttentionModule(image_size=8, embed_dim=16, num_heads=2, num_layers=1, mlp_dim=32)
        if smoke else AttentionModule(image_size=28, patch_size=4, embed_dim=256, num_heads=8, num_layers=6,
                                      mlp_dim=1024),
        batch=_images(512, 4, 28, 8), unit="images", items=lambda b: b[0].shape[0],
        config=lambda smoke: "batch 4, 8 row tokens, dim 16, 1 layer" if smoke
        else "batch 512, 49 patch tokens, dim 256, 8 heads, 6 layers"),
    "gan": Experiment(
        build=lambda smoke: GANModule(image_shape=(1, 8, 8), latent_dim=8, hidden=16) if smoke
        else GANModule(image_shape=(1, 28, 28), latent_dim=64, hidden=1024),
        batch=_gan_batch, unit="images", items=lambda b: b[0].shape[0], step=gan_step,
        config=lambda smoke: "MLP, batch 4, 8x8, hidden 16" if smoke else "MLP, batch 512, 28x28, hidden 1024"),
    "dcgan": Experiment(
        build=lambda smoke: GANModule(image_shape=(1, 8, 8), latent_dim=8, architecture="dcgan", channels=4) if smoke
        else GANModule(image_shape=(3, 64, 64), latent_dim=100, architecture="dcgan", channels=64),
        batch=_dcgan_batch, unit="images", items=lambda b: b[0].shape[0], step=gan_step,
        config=lambda smoke: "DCGAN, batch 4, 8x8, 4 base channels" if smoke
        else "DCGAN, batch 128, 3x64x64, 64 base channels"),
    "gpt": Experiment(
        build=lambda smoke: GPTModule(**(GPT_SMOKE if smoke else GPT_GPU)),
        batch=_tokens, unit="tokens", items=lambda b: b[0].numel(),
        config=lambda smoke: "batch 2, context 16, d_model 16, 1 layer" if smoke
        else "batch 16, context 1024, d_model 768, 12 heads, 12 layers"),
}


# --------------------------------------------------------------------------- timing
def _optimizers(model):
    got = model.configure_optimizers()
    if isinstance(got, dict):
        return [got["optimizer"]]
    if isinstance(got, tuple):  # (optimizers, schedulers)
        got = got[0]
    return list(got) if isinstance(got, (list, tuple)) else [got]


def _autocast(device: torch.device, smoke: bool):
    if smoke or device.type != "cuda":
        return nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class CudaPeakMemory:
    """Peak allocated CUDA memory since start(), in MiB (torch.cuda's allocator statistics)."""

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def run_variant(name: str, variant: str, device: torch.device, smoke: bool, warmup: int, iters: int,
                compile_backend: str, memory=None) -> dict:
    """One experiment in one variant: the first step (its loss reported), `warmup` untimed steps,
    then `iters` timed steps. Peak memory (`memory`: CudaPeakMemory on a GPU, none on the CPU) is
    the peak of the timed steps: the first steps autotune (Triton's benchmarking allocates a
    256 MiB L2-flush buffer) and compile, which a training run does once."""
    exp = EXPERIMENTS[name]
    if memory is None and device.type == "cuda":
        memory = CudaPeakMemory()
    row = {"experiment": name, "variant": variant, "config": exp.config(smoke), "unit": exp.unit}
    try:
        torch.manual_seed(0)
        model = exp.build(smoke).to(device)
        model.train()
        if variant == "torch+compile":
            targets = model.compiled_modules() if hasattr(model, "compiled_modules") else [model]
            for module in targets:
                module.compile(backend=compile_backend, fullgraph=True)
        optimizers = _optimizers(model)
        gen = torch.Generator().manual_seed(1)
        batches = [exp.batch(smoke, device, gen) for _ in range(2)]
        autocast = _autocast(device, smoke)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        times = []
        with gpudl.use_backend("triton" if variant == "triton" else "torch"):
            first_loss = float(exp.step(model, optimizers, batches[0], autocast))
            for i in range(warmup + iters):
                if i == warmup and memory is not None:
                    memory.start()  # after the warm-up: the peak of the timed steps only
                _sync(device)
                start = time.perf_counter()
                exp.step(model, optimizers, batches[i % 2], autocast)
                _sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        row.update(ms_per_step=ms, throughput=exp.items(batches[0]) / (ms / 1e3), first_loss=first_loss,
                   peak_mem_mib=memory.peak_mib() if memory is not None else None)
        if not math.isfinite(first_loss):
            row["error"] = f"non-finite loss {first_loss}"
    except Exception as err:  # one variant failing (e.g. out of memory) must not lose the others
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """speed_vs_torch = torch's ms / this variant's ms (> 1: faster than eager PyTorch);
    loss_diff = |first-step loss - torch's| (same seed, same batch)."""
    base = {r["experiment"]: r for r in rows if r["variant"] == "torch" and "error" not in r}
    for r in rows:
        b = base.get(r["experiment"])
        if b is not None and "error" not in r:
            r["speed_vs_torch"] = b["ms_per_step"] / r["ms_per_step"]
            r["loss_diff"] = abs(r["first_loss"] - b["first_loss"])


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| experiment | config | variant | ms/step | throughput | peak MiB | vs torch | first loss |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['experiment']} | {r['config']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        mem = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "-"
        ratio = f"{r['speed_vs_torch']:.2f}x" if "speed_vs_torch" in r else "-"
        lines.append(f"| {r['experiment']} | {r['config']} | {r['variant']} | {r['ms_per_step']:.2f} | "
                     f"{r['throughput']:,.0f} {r['unit']}/s | {mem} | {ratio} | {r['first_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU through the Triton interpreter")
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on a GPU, 0 in --smoke)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on a GPU, 1 in --smoke)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor on a GPU, "
                                                                "aot_eager in --smoke)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("no CUDA device: the GPU-sized configs need one; run --smoke for the CPU smoke mode")
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    # The smoke mode checks that every step runs; the interpreter's timings mean nothing, so few steps.
    warmup = args.warmup if args.warmup is not None else (0 if smoke else 5)
    iters = args.iters if args.iters is not None else (1 if smoke else 20)
    if warmup < 0 or iters < 1:
        parser.error(f"--warmup must be >= 0 and --iters >= 1, got {warmup} and {iters}")
    compile_backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    if smoke:
        torch.set_num_threads(1)

    rows = []
    for name in args.experiments:
        for variant in args.variants:
            row = run_variant(name, variant, device, smoke, warmup, iters, compile_backend)
            rows.append(row)
            status = row.get("error") or f"{row['ms_per_step']:.2f} ms/step"
            print(f"{'smoke ' if smoke else ''}{name} {variant}: {status}", flush=True)
    add_ratios(rows)

    where = "CPU smoke mode (Triton interpreter; timings meaningless)" if smoke else torch.cuda.get_device_name()
    precision = "fp32" if smoke else ("bf16" if torch.cuda.is_bf16_supported() else "fp16") + " autocast"
    header = (f"Training-step benchmark on {where}: {precision}, median of {iters} steps after {warmup} warm-up, "
              f"compile backend {compile_backend}; torch {torch.__version__}")
    table = markdown(rows, header)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": where, "precision": precision, "iters": iters, "warmup": warmup,
                "compile_backend": compile_backend, "torch": torch.__version__, "smoke": smoke}
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (args.out / "results.md").write_text(table + "\n")

    failed = [f"{r['experiment']} {r['variant']}" for r in rows if "error" in r]
    if smoke:  # the same seed and batch: every variant's first loss must agree (fp32)
        failed += [f"{r['experiment']} {r['variant']} loss differs by {r['loss_diff']:.2e}" for r in rows
                   if r.get("loss_diff", 0.0) > 1e-4 * max(1.0, abs(r["first_loss"]))]
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

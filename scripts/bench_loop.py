"""How much the training loop costs: gpudl's `train()` against a plain PyTorch loop, side by side.

For each experiment, the same model architecture, data split sizes, optimizer, learning rate,
schedule, batch size and epochs, trained twice in fresh processes, alternating, N times each:

    gpudl   `python scripts/train.py experiment=<name> logger=none <the same settings>`
    plain   this script with `--plain <name>`: torch and scikit-learn only; the data as tensors
            batched by index from a seeded per-epoch permutation, torch.optim.Adam, the cosine
            schedule stepped per epoch, one validation pass per epoch, a test pass at the end.

Reported per side (medians over the N runs): training-phase wall time (fit: training and the
per-epoch validation; gpudl's `fit_time_s` in metrics.json), optimizer steps per second in that
phase, whole-process wall time (interpreter start to exit, imports included), and gpudl / plain
ratios. JSON and a Markdown table go to --out.

    python scripts/bench_loop.py                      # every experiment, N=3
    python scripts/bench_loop.py --experiments cnn_digits --runs 5 --out bench/loop
    python scripts/bench_loop.py --quick              # smoke: logreg_cancer, 2 epochs, 1 run
    python scripts/bench_loop.py --same-model         # + the plain loop over gpudl's own model

--same-model adds a third side, timed for its training phase: the plain loop training gpudl's own
LightningModule (its forward and loss, through gpudl.ops) instead of the torch.nn twin. gpudl's
fit time over that one is the loop's own overhead ("loop ratio"); the fit ratio also holds the
difference between gpudl's model implementation and torch.nn's.

Both sides run with the same OMP_NUM_THREADS (--threads, default 1): on a CPU shared with other
work, PyTorch's OpenMP threads wait for each other at every parallel region, and those waits (up
to 100x the step time on the loaded 2-core machine) would drown what is measured here.

The gpudl side needs Hydra (it composes conf/); where Hydra is not installed (the GPU machine),
only the plain side runs and the gpudl columns say so. Nothing heavier than the standard library
is imported at module level, so `--plain` processes pay only for torch and scikit-learn.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The settings both sides use; the gpudl side gets them as explicit overrides, so a change of an
# experiment's config cannot make the two sides train different things unnoticed.
EXPERIMENTS: dict[str, dict] = {
    "cnn_digits": {"data": "digits", "model": "cnn", "epochs": 30, "batch_size": 32, "lr": 2e-3, "cosine": True},
    "rnn_digits": {"data": "digits", "model": "rnn", "epochs": 30, "batch_size": 64, "lr": 3e-3, "cosine": True},
    "attention_digits": {"data": "digits", "model": "attention", "epochs": 30, "batch_size": 64, "lr": 1e-3,
                         "cosine": True},
    "logreg_cancer": {"data": "cancer", "model": "logreg", "epochs": 50, "batch_size": 32, "lr": 1e-2,
                      "cosine": False},
}


# --------------------------------------------------------------------------- the plain loop
def _plain_data(kind: str):
    """The experiment's data split as gpudl splits it (same sizes, stratified, seeds 0 and 1):
    tensors (X_train, y_train, X_val, y_val, X_test, y_test)."""
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    if kind == "digits":
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
    else:
        from sklearn.datasets import load_breast_cancer

        X, y = load_breast_cancer(return_X_y=True)
    n = X.shape[0]
    n_test, n_val = math.ceil(0.15 * n), math.ceil(0.15 * n)
    index = np.arange(n)
    rest, test = train_test_split(index, test_size=n_test, random_state=0, stratify=y)
    train, val = train_test_split(rest, test_size=n_val, random_state=1, stratify=y[rest])
    if kind == "cancer":  # standardized by the train split's statistics
        mean, std = X[train].mean(0), X[train].std(0)
        X = ((X - mean) / np.where(std > 1e-12, std, 1.0)).astype(np.float32)
        y = y.astype(np.float32).reshape(-1, 1)
    out = []
    for part in (train, val, test):
        out += [torch.as_tensor(X[part]), torch.as_tensor(y[part])]
    return out


def _plain_model(name: str):
    """The experiment's architecture in plain torch.nn (the same layers and parameter count)."""
    import torch
    from torch import nn

    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
        )
    if name == "logreg":
        return nn.Linear(30, 1)
    if name == "rnn":
        class RNN(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.RNN(8, 128, batch_first=True)
                self.head = nn.Linear(128, 10)

            def forward(self, x):
                return self.head(self.rnn(x.permute(0, 2, 1, 3).flatten(2))[1][-1])

        return RNN()

    class Block(nn.Module):
        def __init__(self, d=64, heads=4, mlp=128):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Linear(mlp, d))

        def forward(self, x):
            h = self.ln_1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln_2(x))

    class ViT(nn.Module):
        def __init__(self, d=64):
            super().__init__()
            self.embed = nn.Linear(8, d)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.pos_embed = nn.Parameter(torch.randn(1, 9, d) * 0.02)
            self.blocks = nn.Sequential(Block(), Block())
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(self, x):
            h = self.embed(x.flatten(1, 2))  # [N, 1, 8, 8] -> 8 row tokens of 8 pixels
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
            return self.head(self.ln_f(self.blocks(h))[:, 0])

    return ViT()


# gpudl's own modules with the experiments' hyperparameters (conf/model/*.yaml), for the plain loop
# run over gpudl's model: the training loop is then the only difference from the gpudl side.
GPUDL_MODELS = {
    "cnn": ("CNNModule", {"in_channels": 1, "image_size": 8, "num_classes": 10, "channels": (32, 64), "hidden": 128}),
    "rnn": ("RNNModule", {"input_size": 8, "hidden_size": 128, "num_layers": 1, "num_classes": 10}),
    "attention": ("AttentionModule", {"image_size": 8, "embed_dim": 64, "num_heads": 4, "num_layers": 2,
                                      "mlp_dim": 128, "num_classes": 10}),
    "logreg": ("LogisticRegressionModule", {"num_features": 30}),
}


def run_plain(name: str, gpudl_model: bool = False) -> dict:
    """Train one experiment with the plain loop (on the GPU when there is one, as gpudl's
    accelerator=auto); returns its training-phase time, steps and test accuracy. gpudl_model:
    the loop trains gpudl's LightningModule (its forward and loss, called as a torch module)
    instead of the torch.nn twin, so only the loop differs from gpudl's train()."""
    import torch
    import torch.nn.functional as F

    spec = EXPERIMENTS[name]
    torch.manual_seed(12345)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as gpudl's accelerator=auto
    X_tr, y_tr, X_va, y_va, X_te, y_te = (t.to(device) for t in _plain_data(spec["data"]))
    binary = spec["model"] == "logreg"
    if gpudl_model:
        import gpudl.models

        cls, kwargs = GPUDL_MODELS[spec["model"]]
        model = getattr(gpudl.models, cls)(**kwargs).to(device)
        loss_fn = model.loss
    else:
        model = _plain_model(spec["model"]).to(device)
        loss_fn = F.binary_cross_entropy_with_logits if binary else F.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec["epochs"]) if spec["cosine"] else None
    generator = torch.Generator().manual_seed(0)

    def evaluate(X, y):
        model.eval()
        with torch.no_grad():
            out = model(X)
            loss = loss_fn(out, y)
            pred = (out.reshape(-1) > 0).long() if binary else out.argmax(-1)
            acc = (pred == y.reshape(-1).long()).float().mean()
        model.train()
        return float(loss), float(acc)

    bs, n, steps = spec["batch_size"], X_tr.shape[0], 0
    start = time.perf_counter()
    for _ in range(spec["epochs"]):
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = loss_fn(model(X_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        evaluate(X_va, y_va)  # float(loss) waits for the device once per epoch
        if sched is not None:
            sched.step()
    fit = time.perf_counter() - start
    _, test_acc = evaluate(X_te, y_te)
    return {"fit_time_s": fit, "steps": steps, "test_acc": test_acc}


# --------------------------------------------------------------------------- the two sides, timed
def _gpudl_overrides(name: str, epochs: int) -> list[str]:
    spec = EXPERIMENTS[name]
    return [f"experiment={name}", "logger=none", f"trainer.max_epochs={epochs}",
            f"data.batch_size={spec['batch_size']}", f"model.optimizer.lr={spec['lr']}"]


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def time_gpudl(name: str, epochs: int, workdir: Path, threads: int | None = None) -> dict:
    run_dir = workdir / f"gpudl_{name}_{time.monotonic_ns()}"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *_gpudl_overrides(name, epochs),
           f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(threads))
    whole = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"gpudl run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    report = json.loads((run_dir / "metrics.json").read_text())
    return {"whole_s": whole, "fit_time_s": report["fit_time_s"], "steps": report["global_step"],
            "test_acc": report["metrics"].get("test/acc")}


def time_plain(name: str, epochs: int, workdir: Path, threads: int | None = None, gpudl_model: bool = False) -> dict:
    out = workdir / f"plain_{name}_{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", name, "--epochs", str(epochs),
           "--result", str(out), *(["--gpudl-model"] if gpudl_model else [])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(threads))
    whole = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"plain run failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return {"whole_s": whole, **json.loads(out.read_text())}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(name: str, gpudl: list[dict], plain: list[dict], plain_gpudl_model: list[dict]) -> dict:
    row: dict = {"experiment": name, "runs": len(plain)}
    for side, runs in (("gpudl", gpudl), ("plain", plain), ("plain_gpudl_model", plain_gpudl_model)):
        if not runs:
            row[side] = None
            continue
        fit = _median(runs, "fit_time_s")
        row[side] = {"fit_time_s": fit, "whole_s": _median(runs, "whole_s"), "steps": runs[0]["steps"],
                     "steps_per_s": runs[0]["steps"] / fit, "test_acc": _median(runs, "test_acc"),
                     "fit_times_s": [r["fit_time_s"] for r in runs], "whole_times_s": [r["whole_s"] for r in runs]}
    if gpudl and plain:
        row["fit_ratio"] = row["gpudl"]["fit_time_s"] / row["plain"]["fit_time_s"]
        row["whole_ratio"] = row["gpudl"]["whole_s"] / row["plain"]["whole_s"]
    if gpudl and plain_gpudl_model:  # the loop alone: the same gpudl model under both loops
        row["loop_ratio"] = row["gpudl"]["fit_time_s"] / row["plain_gpudl_model"]["fit_time_s"]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device']}; {meta['date']}; load average before/after: {meta['load_before']} / "
        f"{meta['load_after']}; OMP_NUM_THREADS={meta['omp_num_threads']}; median of {meta['runs']} alternating "
        "runs per side.",
        "",
        "| experiment | epochs | steps | gpudl fit s | plain fit s | fit ratio (target ≤ 1.2) | "
        "plain loop + gpudl model fit s | loop ratio | gpudl steps/s | plain steps/s | gpudl process s | "
        "plain process s | process ratio (target ≤ 1.5) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, p, m = r["gpudl"], r["plain"], r.get("plain_gpudl_model")
        same = f"{m['fit_time_s']:.2f}" if m else "(not run)"
        if g is None:
            lines.append(f"| {r['experiment']} | {r['epochs']} | {p['steps']} | (no Hydra: not run) | "
                         f"{p['fit_time_s']:.2f} | | {same} | | | {p['steps_per_s']:.0f} | | {p['whole_s']:.2f} | |")
            continue
        loop = f"{r['loop_ratio']:.2f}×" if "loop_ratio" in r else ""
        lines.append(
            f"| {r['experiment']} | {r['epochs']} | {g['steps']} | {g['fit_time_s']:.2f} | {p['fit_time_s']:.2f} | "
            f"{r['fit_ratio']:.2f}× | {same} | {loop} | {g['steps_per_s']:.0f} | {p['steps_per_s']:.0f} | "
            f"{g['whole_s']:.2f} | {p['whole_s']:.2f} | {r['whole_ratio']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU: {os.cpu_count()} logical cores, {cpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", choices=sorted(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--runs", type=int, default=3, help="runs per side (median); default 3")
    parser.add_argument("--epochs", type=int, default=None, help="override every experiment's epochs")
    parser.add_argument("--quick", action="store_true", help="smoke mode: logreg_cancer, 2 epochs, 1 run")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of both sides (default 1); 0 leaves the environment as it is")
    parser.add_argument("--out", type=Path, default=None, help="folder for loop.json and loop.md")
    parser.add_argument("--same-model", action="store_true",
                        help="also time the plain loop over gpudl's own model (fit only): the loop ratio")
    parser.add_argument("--plain", choices=sorted(EXPERIMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--gpudl-model", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    threads = args.threads or None
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    if args.plain:  # a child process: one plain run
        EXPERIMENTS[args.plain]["epochs"] = args.epochs or EXPERIMENTS[args.plain]["epochs"]
        result = run_plain(args.plain, gpudl_model=args.gpudl_model)
        args.result.write_text(json.dumps(result))
        return 0

    if args.quick:
        args.experiments, args.runs, args.epochs = ["logreg_cancer"], 1, args.epochs or 2
    has_hydra = importlib.util.find_spec("hydra") is not None
    if not has_hydra:
        print("bench_loop: Hydra is not installed, so gpudl's train() (which composes conf/) is not run; "
              "only the plain loop is timed", file=sys.stderr)
    meta = {"device": _device(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": _load(), "runs": args.runs, "python": sys.version.split()[0],
            "omp_num_threads": threads or os.environ.get("OMP_NUM_THREADS", "unset")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
        for name in args.experiments:
            epochs = args.epochs or EXPERIMENTS[name]["epochs"]
            gpudl, plain, same = [], [], []
            sides = ["gpudl", "plain"] + (["same"] if args.same_model else [])
            for i in range(args.runs):  # alternate the sides (and which goes first) against load drift
                for side in (sides if i % 2 == 0 else sides[::-1]):
                    if side == "gpudl" and has_hydra:
                        gpudl.append(time_gpudl(name, epochs, Path(tmp), threads))
                    elif side == "plain":
                        plain.append(time_plain(name, epochs, Path(tmp), threads))
                    elif side == "same":
                        same.append(time_plain(name, epochs, Path(tmp), threads, gpudl_model=True))
            row = summarize(name, gpudl, plain, same)
            row["epochs"] = epochs
            rows.append(row)
            print(f"{name}: " + (f"fit {row['fit_ratio']:.2f}x, process {row['whole_ratio']:.2f}x"
                                 if "fit_ratio" in row else "plain only")
                  + (f", loop {row['loop_ratio']:.2f}x" if "loop_ratio" in row else ""), flush=True)
    meta["load_after"] = _load()
    table = markdown(rows, meta)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "loop.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (args.out / "loop.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

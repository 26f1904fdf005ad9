"""Resilience: a run interrupted after an epoch and resumed with ckpt_path=last ends exactly like
the same run left alone; SIGTERM/SIGINT to a real training process saves a checkpoint it resumes
from; truncated, corrupted or code-carrying checkpoints give a clear error naming the file and
leave the run folder's checkpoints alone; every checkpoint load uses weights_only=True; the W&B
run continues under the same id."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import add_callback

pytest.importorskip("hydra", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")
pytest.importorskip("omegaconf", reason="needs hydra-core and omegaconf (the GPU check machine has neither)")

from gpudl.checkpoints import AtomicCheckpointIO, CheckpointError  # noqa: E402
from gpudl.train import train  # noqa: E402
from gpudl.utils import compose, repo_root  # noqa: E402

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# The CNN on digits, small: 3 epochs of 6 batches, deterministic algorithms, the cosine schedule.
CNN = ["experiment=cnn_digits", "logger=none", "trainer.max_epochs=3", "trainer.limit_train_batches=6",
       "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.deterministic=true", "seed=3", *QUIET]


class _Stop(Exception):
    pass


def test_interrupted_then_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import Callback

    alone = train(compose(CNN, output_dir=tmp_path / "alone"))

    class StopAfterFirstEpoch(Callback):  # a crash after epoch 0 (and its checkpoints) ended
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise _Stop

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        add_callback(patch, StopAfterFirstEpoch())
        with pytest.raises(_Stop):
            train(compose(CNN, output_dir=out))
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "failed"

    resumed = train(compose([*CNN, "ckpt_path=last"], output_dir=out))
    assert resumed == alone  # every metric, bit for bit (val/acc_best included)
    report = json.loads((out / "metrics.json").read_text())
    assert report["status"] == "ok" and report["resumed_from"] == str(out / "checkpoints" / "last.ckpt")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_resume_and_test_load_checkpoints_with_weights_only(tmp_path, monkeypatch):
    args = ["experiment=linreg_toy", "logger=none", "trainer.max_epochs=1", *QUIET]
    out = tmp_path / "run"
    train(compose(args, output_dir=out))
    calls = []
    original = torch.load

    def spy(*a, **kw):
        calls.append(kw.get("weights_only"))
        return original(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    train(compose([*args, "trainer.max_epochs=2", "ckpt_path=last"], output_dir=out))
    assert len(calls) >= 3 and all(w is True for w in calls)  # our check, Lightning's resume, the test's load


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    args = ["experiment=linreg_toy", "logger=none", "trainer.max_epochs=1", *QUIET]
    train(compose(args, output_dir=out))
    return out, args


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "code", "not_a_checkpoint"])
def test_bad_checkpoint_is_a_clear_error_and_nothing_is_overwritten(finished_run, damage, tmp_path):
    out, args = finished_run
    last = out / "checkpoints" / "last.ckpt"
    marker = tmp_path / "code-ran"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "code":  # unpickling this would run a command
        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"state_dict": {}, "payload": Payload()}, last)
    else:
        torch.save({"weights": torch.zeros(2)}, last)
    before = _snapshot(out / "checkpoints")
    config = (out / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError) as info:
        train(compose([*args, "trainer.max_epochs=2", "ckpt_path=last"], output_dir=out))
    message = str(info.value)
    assert str(last) in message
    if damage == "not_a_checkpoint":
        assert "holds no 'state_dict'" in message
    else:
        assert "cannot load checkpoint" in message and "weights_only=True" in message
    assert not marker.exists()
    assert _snapshot(out / "checkpoints") == before  # the good best checkpoint and the bad file, untouched
    assert (out / "config.yaml").read_bytes() == config  # checked before anything is built or written
    # What is written: the failure record (a sweep's summary lists the job), over the run's metrics.json.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "metrics.json"]
    assert json.loads((out / "metrics.json").read_text())["error_type"] == "CheckpointError"


def test_missing_last_checkpoint_says_how_to_resume(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt_path=last: no checkpoint .*last\.ckpt.*hydra\.run\.dir=<run dir>"):
        train(compose(["experiment=linreg_toy", "logger=none", "ckpt_path=last"], output_dir=tmp_path / "new"))


def test_atomic_checkpoint_io_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)
    good = path.read_bytes()

    def dies_halfway(obj, f, *a, **kw):
        Path(f).write_bytes(good[:10])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="logs to W&B (the GPU check machine has no wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    args = ["experiment=linreg_toy", "logger=wandb", "trainer.max_epochs=1", *QUIET]
    train(compose(args, output_dir=out))
    run_id = (out / "wandb_id.txt").read_text().strip()
    train(compose([*args, "trainer.max_epochs=2", "ckpt_path=last"], output_dir=out))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    # Same id (a second folder in the same second gets a "-1" suffix); `wandb sync` merges them.
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d+_\d+-{run_id}(-\d+)?", r.name) for r in runs), runs


# --------------------------------------------------------------------------- signals
# A callback for the training subprocess: it writes a file once training has passed a given step,
# the test's cue to send the signal (instead of sleeping and hoping the run got that far).
STEP_MARKER = """
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class StepMarker(Callback):
    def __init__(self, path, step):
        self.path, self.step = Path(path), step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not self.path.exists():
            self.path.write_text(str(trainer.global_step))
"""


def _start(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "GPUDL_ROOT": str(root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(repo_root() / "scripts" / "train.py"), *args], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_the_run_resumes_from_it(tmp_path, signum):
    run_dir = tmp_path / "run"
    args = ["experiment=cnn_digits", "logger=csv", "trainer.limit_train_batches=10", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", *QUIET]
    (tmp_path / "step_marker.py").write_text(STEP_MARKER)
    marker = tmp_path / "reached_step_12"
    proc = _start(tmp_path, *args, "trainer.max_epochs=1000", f"hydra.run.dir={run_dir}",
                  "+callbacks.step_marker._target_=step_marker.StepMarker", f"+callbacks.step_marker.path={marker}",
                  "+callbacks.step_marker.step=12")  # epoch 0 is steps 1-10, and ends with last.ckpt
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "step 12 not reached in 300 s"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert f"interrupted by {signal.Signals(signum).name}" in stderr and "ckpt_path=last" in stderr
    assert "weights_only" not in stderr  # the save states what it keeps; Lightning logs nothing about it
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] >= 12  # saved when the signal came, after epoch 0's last.ckpt (step 10)
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["status"] == "interrupted" and report["last_checkpoint"] == str(last)
    if signum == signal.SIGINT:
        return  # the same resume as below

    # Resume in the same folder, two more epochs.
    epochs = saved["epoch"] + 2
    proc = _start(tmp_path, *args, f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}", "ckpt_path=last")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["status"] == "ok" and report["resumed_from"] == str(last)
    assert torch.load(last, weights_only=True)["epoch"] == epochs - 1
    assert "test/acc" in report["metrics"]

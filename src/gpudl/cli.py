"""The command lines: `gpudl-train` and `gpudl-eval` (installed console scripts), also run by
`python scripts/train.py` and `python scripts/eval.py` in a checkout. Hydra composes the configs
that ship inside the package (pkg://gpudl.conf) with the command-line overrides.

    gpudl-train experiment=logreg_cancer optimizer=gd logger=csv
    gpudl-train -m model.optimizer.lr=1e-3,1e-2 seed=1,2            # a sweep
    gpudl-eval run_dir=logs/logreg_cancer/runs/<timestamp>          # test the checkpoint the run tested

Outputs land under paths.root_dir = $GPUDL_ROOT (scripts/ sets it to the checkout), else the
working directory: logs/<task_name>/runs/<timestamp>/, multiruns under logs/<task_name>/multiruns/.
Lightning and the models are imported only once Hydra has composed the config, so `--help` and a
mistyped override answer at once.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

CONFIGS = "pkg://gpudl.conf"


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """Train one job; returns cfg.optimized_metric's value to Hydra's sweepers (None for a failed job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gpudl.callbacks import NonFiniteLossError, TrainingInterrupted
    from gpudl.train import ConfigError, train

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    fail_fast = cfg.get("fail_fast")
    if fail_fast is None:
        fail_fast = not multirun  # a sweep goes on past a failed job; a single run fails
    try:
        metrics = train(cfg)
    except TrainingInterrupted as err:
        # Preempted or Ctrl+C: the checkpoint is saved; stop the whole process (and sweep).
        print(f"gpudl: {err}; resume with the same overrides plus "
              f"hydra.run.dir={cfg.paths.output_dir} ckpt_path=last", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except Exception as err:
        if not fail_fast:
            # train() wrote the error into this job's metrics.json (status: failed); the summary
            # lists it. None, not NaN: the Optuna sweeper (1.3 with optuna 2.10) marks a None
            # trial FAIL and goes on (max_failure_rate), but crashes on NaN (it tells twice).
            print(f"gpudl: job failed and recorded in {cfg.paths.output_dir}/metrics.json; the sweep goes on: "
                  f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return None
        if isinstance(err, ConfigError):
            # A mistake in the config: one clear line, no traceback; exit status 2 like argparse.
            print(f"gpudl: config error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if isinstance(err, NonFiniteLossError):
            print(f"gpudl: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None  # train() warned if it was not logged


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="eval")
def eval_main(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint of a finished run; prints and returns the test metrics."""
    from gpudl.train import ConfigError, evaluate

    try:
        return evaluate(cfg)
    except ConfigError as err:
        print(f"gpudl: config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

"""Train one experiment (or sweep many) from the Hydra configs in conf/.

    python scripts/train.py                                   # experiment=cnn_digits
    python scripts/train.py experiment=linreg_toy optimizer=gd logger=csv
    python scripts/train.py -m model.optimizer.lr=1e-3,1e-2 seed=1,2
    python scripts/train.py debug=fdr                         # one batch of everything
    python scripts/train.py hparams_search=cnn_digits_optuna  # Bayesian search (Optuna)
    python scripts/train.py hydra.run.dir=<run dir> ckpt_path=last   # continue an interrupted run

Outputs: logs/<task_name>/runs/<timestamp>/ (multirun: logs/<task_name>/multiruns/<timestamp>/<job>/).
Returns the value of `optimized_metric` for Hydra sweepers.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Anchor logs/ at the repository whatever the working directory (paths.root_dir reads it).
os.environ.setdefault("GPUDL_ROOT", str(ROOT))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gpudl.callbacks import NonFiniteLossError, TrainingInterrupted  # noqa: E402
from gpudl.train import ConfigError, metric_value, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
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
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()

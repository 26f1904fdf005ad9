"""Train one experiment (or sweep many) from the Hydra configs in conf/.

    python scripts/train.py                                   # experiment=cnn_digits
    python scripts/train.py experiment=linreg_toy optimizer=gd logger=csv
    python scripts/train.py -m model.optimizer.lr=1e-3,1e-2 seed=1,2
    python scripts/train.py debug=fdr                         # one batch of everything

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

from gpudl.callbacks import NonFiniteLossError  # noqa: E402
from gpudl.train import ConfigError, metric_value, train  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except ConfigError as err:
        # A mistake in the config: one clear line, no traceback; exit status 2 like argparse.
        print(f"gpudl: config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        print(f"gpudl: {err}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # a sweep goes on: some learning rates are expected to diverge
        raise SystemExit(1) from None
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()

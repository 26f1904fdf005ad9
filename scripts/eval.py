"""Test a saved checkpoint on its run's test split, with the run's own config.

    python scripts/eval.py ckpt_path=logs/cnn_digits/runs/<timestamp>/checkpoints/last.ckpt

The run's config.yaml (written by train() next to checkpoints/) rebuilds the datamodule and the
model; the weights load with torch.load(weights_only=True). Prints and returns the test metrics.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPUDL_ROOT", str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gpudl.train import ConfigError, evaluate  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> dict:
    try:
        return evaluate(cfg)
    except ConfigError as err:
        print(f"gpudl: config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

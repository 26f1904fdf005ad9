"""Test a saved checkpoint on its run's test split, with the run's own config: `gpudl-eval` in a checkout.

    python scripts/eval.py run_dir=logs/cnn_digits/runs/<timestamp>       # the checkpoint the run tested
    python scripts/eval.py ckpt_path=logs/cnn_digits/runs/<timestamp>/checkpoints/last.ckpt

The run's config.yaml (written by train() next to checkpoints/) rebuilds the datamodule and the
model; the weights load with torch.load(weights_only=True). Prints the test metrics and writes
them to logs/eval/runs/<timestamp>/eval_metrics.json. See gpudl.cli.
"""

import os
from pathlib import Path

os.environ.setdefault("GPUDL_ROOT", str(Path(__file__).resolve().parents[1]))

from gpudl.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    eval_main()
